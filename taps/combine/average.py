"""Checkpoint averaging (ALGORITHMS.md section 7): one head whose trainable weights are the
weighted element-wise average of the drafters'. The frozen embedding and LM head are the
target's in every drafter; draft vocabularies (d2t) are united so no drafter loses tokens."""

from __future__ import annotations

import torch

from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead


def resolve_weights(n: int, weights: list[float] | None, alpha: float | None) -> list[float]:
    """Explicit `weights` (normalised to sum 1), else [alpha, 1 - alpha] for two drafters (the
    paper's sweep variable), else uniform."""
    if weights is not None:
        w = [float(x) for x in weights]
        if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"routing.weights={w}: need {n} non-negative weights, not all 0")
        return [x / sum(w) for x in w]
    if alpha is not None:
        if n != 2 or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"routing.alpha={alpha}: needs exactly 2 drafters and 0 <= a <= 1")
        return [float(alpha), 1.0 - float(alpha)]
    return [1.0 / n] * n


@torch.no_grad()
def average_heads(heads: list[DraftHead], weights: list[float]) -> DraftHead:
    first = heads[0]
    states = [h.state_dict() for h in heads]
    params = [k for k in states[0] if k != "d2t"]
    for h, s in zip(heads[1:], states[1:], strict=True):
        bad = [k for k in params if k not in s or s[k].shape != states[0][k].shape]
        if bad or h.embed_weight.shape != first.embed_weight.shape:
            raise ValueError(f"cannot average drafters of different shapes (e.g. {bad[:3]})")
    if any(h.d2t is None for h in heads):
        d2t = None
    else:
        d2t = torch.unique(torch.cat([h.d2t.cpu() for h in heads]))  # sorted union
    avg = DraftHead(first.config, first.embed_weight, first.lm_head_full, first.fc.bias is not None,
                    d2t)  # fmt: skip
    state = {}
    for k in params:
        mean = sum(w * s[k].double() for w, s in zip(weights, states, strict=True))
        state[k] = mean.to(states[0][k].dtype)
    missing, unexpected = avg.load_state_dict(state, strict=False)
    assert set(missing) <= {"d2t"} and not unexpected, (missing, unexpected)
    return avg.to(device=first.fc.weight.device, dtype=first.fc.weight.dtype).eval()


def build(
    heads: list[DraftHead],
    spec: TreeSpec,
    weights: list[float] | None = None,
    alpha: float | None = None,
) -> HeadDrafter:
    return HeadDrafter(average_heads(heads, resolve_weights(len(heads), weights, alpha)), spec)
