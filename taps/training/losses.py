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


def eagle_loss(
    g: Tensor, f_next: Tensor, mask: Tensor, lm_head: Tensor, w: LossWeights
) -> tuple[Tensor, dict[str, Tensor]]:
    """g, f_next [B, n, h]; mask [B, n] (1 where f_next is supervised); lm_head [V, h].

    feature loss: SmoothL1(g, f_next) averaged over h; token loss: soft cross-entropy
    -sum_v p(v) log q(v) with p = softmax(W f_next), q = softmax(W g). Both are normalised by
    the number of supervised positions.
    """
    sel = mask.bool()
    count = sel.sum().clamp(min=1)
    gs, fs = g[sel], f_next[sel].to(g.dtype)
    feat = F.smooth_l1_loss(gs, fs, reduction="none").mean(-1).sum() / count
    with torch.no_grad():
        p = torch.softmax(fs @ lm_head.T, dim=-1)
    logq = torch.log_softmax(gs @ lm_head.T, dim=-1)
    token = -(p * logq).sum(-1).sum() / count
    loss = w.feature * feat + w.token * token
    with torch.no_grad():
        acc = (logq.argmax(-1) == p.argmax(-1)).float().sum() / count
    return loss, {
        "loss": loss.detach(),
        "feature_loss": feat.detach(),
        "token_loss": token.detach(),
        "top1": acc,
    }
