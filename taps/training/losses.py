"""EAGLE-2 training loss (ALGORITHMS.md section 3), computed on supervised positions only.

Computing the 49k-way logits only where the loss mask is 1 is the main memory and time saving:
the target's LM head dominates a small head's cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossWeights:
    feature: float = 1.0
    token: float = 0.1


def target_probs_at(f_next: Tensor, mask: Tensor, lm_head: Tensor) -> Tensor:
    """p = softmax(W f_next) at supervised positions [M, V]; constant, so HASS's alignment
    steps (same targets every step) compute it once per batch."""
    with torch.no_grad():
        return torch.softmax(f_next[mask.bool()] @ lm_head.T, dim=-1)


def eagle_loss(
    g: Tensor,
    f_next: Tensor,
    mask: Tensor,
    lm_head: Tensor,
    w: LossWeights,
    p: Tensor | None = None,
    topk: int = 0,
    topk_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """g, f_next [B, n, h]; mask [B, n] (1 where f_next is supervised); lm_head [V, h].

    feature loss: SmoothL1(g, f_next) averaged over h; token loss: soft cross-entropy
    -sum_v p(v) log q(v) with p = softmax(W f_next), q = softmax(W g). Both are normalised by
    the number of supervised positions. `p` may be passed precomputed (`target_probs_at`).
    With topk_weight > 0, HASS's distillation -sum_{v in TopK(p)} p(v) log q(v) (p not
    renormalised) is added, reusing the same q.
    """
    sel = mask.bool()
    count = sel.sum().clamp(min=1)
    gs, fs = g[sel], f_next[sel].to(g.dtype)
    feat = F.smooth_l1_loss(gs, fs, reduction="none").mean(-1).sum() / count
    if p is None:
        p = target_probs_at(f_next.to(g.dtype), mask, lm_head)
    logq = torch.log_softmax(gs @ lm_head.T, dim=-1)
    token = -(p * logq).sum(-1).sum() / count
    loss = w.feature * feat + w.token * token
    metrics = {"feature_loss": feat.detach(), "token_loss": token.detach()}
    if topk_weight > 0:
        top_p, top_i = p.topk(topk, dim=-1)
        distill = -(top_p * logq.gather(-1, top_i)).sum(-1).sum() / count
        loss = loss + topk_weight * distill
        metrics["topk_loss"] = distill.detach()
    with torch.no_grad():
        acc = (logq.argmax(-1) == p.argmax(-1)).float().sum() / count
    return loss, {"loss": loss.detach(), **metrics, "top1": acc}
