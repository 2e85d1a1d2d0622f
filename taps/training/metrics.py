"""Held-out drafter metrics under the drafter's own rollout, as it will draft at inference.

`rollout` gives g^d[t]: the head's output at position t when its context holds real
features only up to t-d+1 and its own predictions after that, i.e. depth d of a draft chain
that started after position t-d+1. Top-1 at depth d compares its argmax with the target's
(full-vocabulary) argmax. A chain drafted after position s is accepted through depth d when
depths 1..d are all right at s, s+1, .., s+d-1; the simulated acceptance length is 1 plus the
mean accepted depth over start positions (greedy chain drafting, rollout tokens = data tokens,
which is exact where the data are the target's own greedy responses).
"""

from __future__ import annotations

import torch
from torch import Tensor

from taps.models.heads import AnyHead
from taps.training.eagle3 import ttt_forward
from taps.training.hass import hass_forward


def rollout(head: AnyHead, f_in: Tensor, tokens: Tensor, depth: int) -> list[Tensor]:
    """The head's outputs at draft depths 1..depth from every position, as it drafts: HASS's
    context alignment for EAGLE-1/2 heads, training-time test for EAGLE-3 heads."""
    if getattr(head, "kind", "eagle2") == "eagle3":
        return ttt_forward(head, head.fuse(f_in), tokens, depth)
    return hass_forward(head, f_in, tokens, depth)


@torch.no_grad()
def rollout_metrics(
    head: AnyHead,
    f_in: Tensor,
    tokens: Tensor,
    f_next: Tensor,
    mask: Tensor,
    depth: int,
    top: Tensor | None = None,
) -> dict[str, Tensor]:
    """`top` [B, n]: the target's argmax at f_next where the features store it (EAGLE-3's);
    None computes it from f_next."""
    sel = mask.bool()
    count = sel.sum().clamp(min=1)
    if top is not None:
        want = top[sel]
    else:
        want = (f_next[sel].to(head.lm_head_full.dtype) @ head.lm_head_full.T).argmax(-1)
    n = sel.shape[1]
    run = sel.clone()
    accepted = torch.zeros((), device=sel.device)
    out: dict[str, Tensor] = {}
    for d, g in enumerate(rollout(head, f_in, tokens, depth)):
        right = torch.zeros_like(sel)
        right[sel] = head.to_target(head.logits(g[sel]).argmax(-1)) == want
        out[f"top1_d{d + 1}"] = right.sum() / count
        # Depth d+1 of the chain started at s is checked at position s+d.
        shifted = torch.zeros_like(sel)
        shifted[:, : n - d] = right[:, d:]
        run = run & shifted
        accepted = accepted + run.sum()
    out["sim_tau"] = 1 + accepted / count
    return out
