"""HASS training objective for the same EAGLE head (ALGORITHMS.md section 3).

Harmonized context alignment: at inference, a head drafting at depth k+1 from position r sees
real features only up to r-k and its own earlier predictions after that. Training step k+1
reproduces this. Step 1 is plain EAGLE-2 training; after step k the predictions g^k become a
new input set q^k (q^k[0] = f_0, q^k[t] = g^k_{t-1}, detached). In step k+1 every set goes
through the same fc; queries and the residual stream come from the newest set; a query at r
attends to real-feature keys at t <= r-k and to exactly one key of each predicted set j, the one
at t = r-k+j, which is what its own chain of drafts would have produced. Masking uses -inf
(a boolean SDPA mask), not the reference code's 0-logit fill, and right padding is never
visible to a real position because every allowed key satisfies t <= r.

Harmonized objective distillation adds -sum_{v in TopK(p)} p(v) log q(v) (p not renormalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from taps.models.draft_head import DraftHead
from taps.training.losses import LossWeights, eagle_loss, supervised, target_probs_at


@dataclass(frozen=True)
class HassConfig:
    steps: int = 3  # forward steps of context alignment (1 = plain EAGLE-2)
    topk: int = 10
    topk_weight: float = 1.0


def alignment_mask(n: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool [n, (k+1) n]: keys of the real set, then predicted sets 1..k, for step k+1.
    Query r sees real t <= r-k and, in predicted set j, only t == r-k+j (j = k is itself)."""
    r = torch.arange(n, device=device)[:, None]
    t = torch.arange(n, device=device)[None, :]
    blocks = [t <= r - k] + [t == r - k + j for j in range(1, k + 1)]
    return torch.cat(blocks, dim=1)


def hass_forward(head: DraftHead, f_in: Tensor, tokens: Tensor, steps: int) -> list[Tensor]:
    """The head's outputs g^1..g^steps; g^{k+1}[r] is what it drafts at depth k+1 from r."""
    b, n, _ = f_in.shape
    pos = torch.arange(n, device=f_in.device).expand(b, n)
    rope = head.rotary(pos, f_in.dtype)
    emb = F.embedding(tokens, head.embed_weight).to(f_in.dtype)
    sets = [head.fc(torch.cat([emb, f_in], dim=-1))]
    outs: list[Tensor] = []
    for k in range(steps):
        if k == 0:
            g = head.layer(sets[0], rope, None, None)  # plain causal: EAGLE-2 training
        else:
            ctx = torch.cat(sets[:k], dim=1)
            ctx_rope = tuple(torch.cat([c] * k, dim=2) for c in rope)
            mask = alignment_mask(n, k, f_in.device)
            g = head.layer(sets[k], rope, None, mask, context=(ctx, ctx_rope))
        outs.append(g)
        if k + 1 < steps:
            shifted = torch.cat([f_in[:, :1], g[:, :-1].detach().to(f_in.dtype)], dim=1)
            sets.append(head.fc(torch.cat([emb, shifted], dim=-1)))
    return outs


def hass_loss(
    head: DraftHead,
    f_in: Tensor,
    tokens: Tensor,
    f_next: Tensor,
    mask: Tensor,
    weights: LossWeights,
    cfg: HassConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum over alignment steps of (EAGLE-2 loss + topk_weight * top-K distillation)."""
    total = torch.zeros((), device=f_in.device)
    metrics: dict[str, Tensor] = {}
    rows = supervised(mask)  # the same rows and targets at every step: computed once
    p = target_probs_at(f_next.to(f_in.dtype), rows, head.lm_head_weight)
    for k, g in enumerate(hass_forward(head, f_in, tokens, cfg.steps)):
        loss, m = eagle_loss(
            g, f_next, mask, head.lm_head_weight, weights, p, cfg.topk, cfg.topk_weight, rows
        )
        total = total + loss
        metrics.update({f"step{k + 1}/{name}": v for name, v in m.items()})
    metrics["loss"] = total.detach()
    metrics["top1"] = metrics["step1/top1"]
    return total, metrics
