"""Checkpoint averaging (ALGORITHMS.md section 7): one head whose trainable weights are the
weighted element-wise average of the drafters'. The frozen embedding (and, for EAGLE-1/2, the
LM head) are the target's in every drafter; draft vocabularies (d2t) are united so no drafter
loses tokens. An EAGLE-3 head's own LM head has one row per draft token: a token's row is the
average over the drafters that have it, their weights renormalised."""

from __future__ import annotations

import torch

from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead
from taps.models.eagle3_head import Eagle3Head
from taps.models.heads import AnyHead


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


def _check_shapes(heads: list[AnyHead], states: list[dict], params: list[str]) -> None:
    first = heads[0]
    kinds = {h.kind for h in heads}
    if len(kinds) > 1:
        raise ValueError(f"cannot average drafters of different kinds ({sorted(kinds)})")
    if len({h.aux_layers for h in heads}) > 1:
        raise ValueError("cannot average EAGLE-3 drafters that fuse different target layers")
    for h, s in zip(heads[1:], states[1:], strict=True):
        bad = [k for k in params if k not in s or s[k].shape != states[0][k].shape]
        if bad or h.embed_weight.shape != first.embed_weight.shape:
            raise ValueError(f"cannot average drafters of different shapes (e.g. {bad[:3]})")


def _united_rows(
    heads: list[AnyHead], weights: list[float]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(d2t of the union, the weighted mean of each token's LM-head row over the heads that
    have it): EAGLE-3 heads train their own rows of their own draft vocabulary."""
    vocab = heads[0].lm_head_full.shape[0]
    ids = [torch.arange(vocab) if h.d2t is None else h.d2t.cpu() for h in heads]
    union = torch.unique(torch.cat(ids))  # sorted
    width = heads[0].lm_head.weight.shape[1]
    num = torch.zeros(len(union), width, dtype=torch.float64)
    den = torch.zeros(len(union), 1, dtype=torch.float64)
    for h, w, i in zip(heads, weights, ids, strict=True):
        at = torch.searchsorted(union, i)
        num[at] += w * h.lm_head.weight.detach().cpu().double()
        den[at] += w
    rows = num / den.clamp(min=1e-300)
    return (None if len(union) == vocab else union), rows


@torch.no_grad()
def average_heads(heads: list[AnyHead], weights: list[float]) -> AnyHead:
    first = heads[0]
    states = [h.state_dict() for h in heads]
    per_token = {"d2t", "lm_head.weight"} if first.kind == "eagle3" else {"d2t"}
    params = [k for k in states[0] if k not in per_token]
    _check_shapes(heads, states, params)
    state = {}
    for k in params:
        mean = sum(w * s[k].double() for w, s in zip(weights, states, strict=True))
        state[k] = mean.to(states[0][k].dtype)
    if first.kind == "eagle3":
        d2t, rows = _united_rows(heads, weights)
        avg = Eagle3Head(
            first.config, first.embed_weight, first.lm_head_full, first.aux_layers, d2t
        )
        state["lm_head.weight"] = rows.to(first.lm_head.weight.dtype)
    else:
        united = (
            None if any(h.d2t is None for h in heads) else torch.cat([h.d2t.cpu() for h in heads])
        )
        d2t = None if united is None else torch.unique(united)  # sorted union
        avg = DraftHead(first.config, first.embed_weight, first.lm_head_full, first.bias, d2t)
    missing, unexpected = avg.load_state_dict(state, strict=False)
    assert set(missing) <= {"d2t"} and not unexpected, (missing, unexpected)
    return avg.to(device=first.fc.weight.device, dtype=first.fc.weight.dtype).eval()


def build(
    heads: list[AnyHead],
    spec: TreeSpec,
    weights: list[float] | None = None,
    alpha: float | None = None,
) -> HeadDrafter:
    return HeadDrafter(average_heads(heads, resolve_weights(len(heads), weights, alpha)), spec)
