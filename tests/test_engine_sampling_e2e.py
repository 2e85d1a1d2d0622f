"""End to end on the tiny float64 target: the first three tokens of speculative sampling
(token 1 from prefill, tokens 2-3 from the first draft/verify cycle) follow the target's own
distribution, computed exactly; a decoder with a broken acceptance rule fails the same test."""

from __future__ import annotations

import pytest
import torch

import taps.engine.decoder as decoder_mod
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.verify import target_probs
from tests.helpers import TopKOracle
from tests.test_engine_sampling import broken_no_residual, chi_square_pvalue

SAMPLES = 6000
PROMPT = [1, 57, 305, 12, 9, 401, 77, 2, 198, 1, 520, 363]


@torch.no_grad()
def exact_next(model, prefixes: list[list[int]], temperature: float, top_p: float):
    h = model(torch.tensor(prefixes))[:, -1]
    return target_probs(model.logits(h), temperature, top_p)


def joint_test(
    tiny64,
    temperature: float,
    top_p: float,
    proposer=None,
    min_accept: float = 0.2,
    samples: int = SAMPLES,
) -> tuple[float, float]:
    """`proposer` (default: one TopKOracle; the decoder hands it the prompt through
    `set_prompt`); `min_accept` is the least mean number of accepted draft tokens per first cycle."""
    model = tiny64.model
    if proposer is None:
        proposer = TopKOracle(model)
    dec = SpeculativeDecoder(model, proposer, eos_ids=set())
    gen = torch.Generator().manual_seed(7)
    counts: dict[tuple[int, int, int], int] = {}
    accepted = 0
    for _ in range(samples):
        out = dec.generate(PROMPT, 3, temperature, top_p, gen, record_nodes=False)
        key = tuple(out.tokens)
        counts[key] = counts.get(key, 0) + 1
        accepted += out.cycles[0].accepted
    rate = accepted / samples
    assert min_accept < rate < 1.8, f"drafts accepted {rate:.2f} per cycle: want some, not all"
    # Exact P(x1, x2, x3) for every observed triple; everything unobserved is pooled.
    p1 = exact_next(model, [PROMPT], temperature, top_p)[0]
    pairs = sorted({k[:2] for k in counts})
    p2 = exact_next(model, [PROMPT + [a] for a, _ in pairs], temperature, top_p)
    p3 = exact_next(model, [PROMPT + list(ab) for ab in pairs], temperature, top_p)
    keys = sorted(counts)
    probs = torch.tensor(
        [
            float(p1[a] * p2[pairs.index((a, b)), b] * p3[pairs.index((a, b)), c])
            for a, b, c in keys
        ],
        dtype=torch.float64,
    )
    obs = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    # Cells expected >= 5 times stand alone; every other triple, observed or not, is one pool.
    big = probs * samples >= 5
    cells_obs = torch.cat([obs[big], (samples - obs[big].sum())[None]])
    cells_p = torch.cat([probs[big], (1 - probs[big].sum())[None]])
    tv = 0.5 * float((cells_obs / samples - cells_p).abs().sum())
    return chi_square_pvalue(cells_obs, cells_p), tv


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_tiny_target_sampling_is_lossless(tiny64, temperature, top_p):
    p, tv = joint_test(tiny64, temperature, top_p)
    assert p > 1e-3, f"chi-square p={p:.2e} TV={tv:.3f}"


def test_tiny_target_broken_rule_fails(tiny64, monkeypatch):
    monkeypatch.setattr(decoder_mod, "accept_sampling", broken_no_residual)
    p, _ = joint_test(tiny64, 1.0, 1.0)
    assert p < 1e-6


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_lazy_logits_sample_exactly_what_eager_logits_sample(tiny64, temperature, top_p):
    """Lazy target logits (eval.lazy_logits_from) walk the same nodes with the same random
    draws as logits computed for the whole tree, so with one seed both decoders produce the
    same tokens; with the chi-square test above on the eager path, lazy sampling is lossless."""
    from taps.engine.drafting import HeadDrafter, TreeSpec
    from taps.models.draft_head import DraftHead

    torch.manual_seed(0)
    head = DraftHead.for_target(tiny64.model)
    runs = []
    for lazy in (None, 1):
        dec = SpeculativeDecoder(tiny64.model, HeadDrafter(head, TreeSpec(3, 3, 12)),
                                 tiny64.eos_ids, lazy_logits_from=lazy)  # fmt: skip
        gen = torch.Generator().manual_seed(11)
        runs.append([dec.generate(PROMPT[: 4 + i], 24, temperature, top_p, gen) for i in range(6)])
    eager, lazy = runs
    assert [g.tokens for g in eager] == [g.tokens for g in lazy]
    assert sum(c.accepted for g in eager for c in g.cycles) > 0  # drafts were accepted
