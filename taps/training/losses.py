"""EAGLE-2 training loss (ALGORITHMS.md section 3), computed on supervised positions only.

Computing the 49k-way logits only where the loss mask is 1 is the main memory and time saving:
the target's LM head dominates a small head's cost. The supervised rows are padded to a multiple
of `ROW_BUCKET` (`Rows`): oneDNN builds and keeps a kernel for every matmul shape it sees under
bf16 autocast, and a row count that changes every batch grew training's resident memory by
about 10 MB a step (experiments/README.md, "The make run default").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ROW_BUCKET = 128


@dataclass(frozen=True)
class Rows:
    """The supervised positions of a batch as indices into its flattened [B n] positions,
    padded to a multiple of a bucket with weight 0 (real rows first, then padding)."""

    index: Tensor  # [R] long
    weight: Tensor  # [R] float: 1 for a supervised position, 0 for padding
    count: Tensor  # real rows (at least 1: the normaliser of every loss)

    def of(self, x: Tensor) -> Tensor:
        """x [B, n, ...] at these rows: [R, ...]."""
        return x.flatten(0, 1)[self.index]


def supervised(mask: Tensor, bucket: int = ROW_BUCKET) -> Rows:
    """Rows where mask [B, n] is nonzero, padded with copies of row 0 to a multiple of bucket."""
    index = mask.reshape(-1).nonzero().squeeze(-1)
    real, pad = len(index), -len(index) % bucket
    index = torch.cat([index, index.new_zeros(pad)])
    weight = torch.zeros(real + pad, device=mask.device)
    weight[:real] = 1.0
    return Rows(index, weight, torch.tensor(max(real, 1), device=mask.device))


@dataclass(frozen=True)
class LossWeights:
    feature: float = 1.0
    token: float = 0.1


def target_probs_at(f_next: Tensor, rows: Rows, lm_head: Tensor) -> Tensor:
    """p = softmax(W f_next) at the rows [R, V]; constant, so HASS's alignment steps (same
    targets every step) compute it once per batch."""
    with torch.no_grad():
        return torch.softmax(rows.of(f_next) @ lm_head.T, dim=-1)


def eagle_loss(
    g: Tensor,
    f_next: Tensor,
    mask: Tensor,
    lm_head: Tensor,
    w: LossWeights,
    p: Tensor | None = None,
    topk: int = 0,
    topk_weight: float = 0.0,
    rows: Rows | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """g, f_next [B, n, h]; mask [B, n] (1 where f_next is supervised); lm_head [V, h].

    feature loss: SmoothL1(g, f_next) averaged over h; token loss: soft cross-entropy
    -sum_v p(v) log q(v) with p = softmax(W f_next), q = softmax(W g). Both are normalised by
    the number of supervised positions. `rows` (`supervised(mask)`) and `p` at them
    (`target_probs_at`) may be passed precomputed, as HASS's steps share both.
    With topk_weight > 0, HASS's distillation -sum_{v in TopK(p)} p(v) log q(v) (p not
    renormalised) is added, reusing the same q.
    """
    rows = supervised(mask) if rows is None else rows
    count, w8 = rows.count, rows.weight
    gs, fs = rows.of(g), rows.of(f_next).to(g.dtype)
    feat = (F.smooth_l1_loss(gs, fs, reduction="none").mean(-1) * w8).sum() / count
    if p is None:
        p = target_probs_at(f_next.to(g.dtype), rows, lm_head)
    logq = torch.log_softmax(gs @ lm_head.T, dim=-1)
    token = -((p * logq).sum(-1) * w8).sum() / count
    loss = w.feature * feat + w.token * token
    metrics = {"feature_loss": feat.detach(), "token_loss": token.detach()}
    if topk_weight > 0:
        top_p, top_i = p.topk(topk, dim=-1)
        distill = -((top_p * logq.gather(-1, top_i)).sum(-1) * w8).sum() / count
        loss = loss + topk_weight * distill
        metrics["topk_loss"] = distill.detach()
    with torch.no_grad():
        acc = ((logq.argmax(-1) == p.argmax(-1)) * w8).sum() / count
    return loss, {"loss": loss.detach(), **metrics, "top1": acc}
