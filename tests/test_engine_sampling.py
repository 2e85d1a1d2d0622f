"""Speculative sampling must leave the target's distribution unchanged.

A bigram "target" over 8 tokens gives exact reference probabilities. Each sample runs one
acceptance cycle on a fixed draft tree (two branches that share tokens, so sibling rejection
and residual renormalisation are exercised), then extends the output by ancestral sampling to 3
tokens. The 3-token joint must match the bigram chain's; a deliberately broken rule must not.
"""

from __future__ import annotations

import math

import pytest
import torch

from taps.engine.tree import DraftTree
from taps.engine.verify import NodeLogits, accept_sampling, target_probs

V, SAMPLES = 8, 20_000
TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5


def tree() -> DraftTree:
    # root 0 -> {1 -> 2 -> 3, 1 -> 4, 5 -> 6}: a duplicate-free tree with siblings at depth 1/2
    tokens = torch.tensor([0, 1, 5, 2, 4, 6, 3])
    parents = [-1, 0, 0, 1, 1, 2, 3]
    lp = torch.tensor([0, -0.2, -1.0, -0.3, -0.9, -0.5, -0.4], dtype=torch.float64)
    return DraftTree(tokens, parents, lp, lp.clone(), torch.zeros(7))


def sample_cycle(rule, temperature, top_p, gen) -> list[int]:
    t = tree()
    logits = TABLE[t.tokens]  # the target's logits at each node depend on the node's token
    path, bonus = rule(t, logits, temperature, top_p, gen)
    out = t.tokens[path[1:]].tolist() + [bonus]
    while len(out) < 3:
        p = target_probs(TABLE[out[-1]], temperature, top_p)
        out.append(int(torch.multinomial(p.float(), 1, generator=gen)))
    return out[:3]


def exact(temperature, top_p) -> torch.Tensor:
    p = target_probs(TABLE, temperature, top_p)  # p[a, b] = P(next = b | last = a)
    return p[0][:, None, None] * p[:, :, None] * p[None, :, :]  # P(x1, x2, x3 | root 0)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square with cells of expected count < 5 pooled."""
    n = counts.sum()
    exp = probs.flatten() * n
    obs = counts.flatten().double()
    small = exp < 5
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    o = torch.cat([obs[~small], obs[small].sum()[None]])
    keep = e > 0
    stat = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty normal approximation to the chi-square tail.
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def run(rule, temperature, top_p) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V, V, V)
    for _ in range(SAMPLES):
        a, b, c = sample_cycle(rule, temperature, top_p, gen)
        counts[a, b, c] += 1
    ref = exact(temperature, top_p)
    tv = 0.5 * float((counts / SAMPLES - ref).abs().sum())
    return chi_square_pvalue(counts, ref), tv


def broken_no_residual(t, logits, temperature, top_p=1.0, generator=None):
    """Broken: after rejecting a draft token, samples the bonus from p instead of the residual."""
    if isinstance(logits, NodeLogits):  # the decoder's lazy rows: take them all
        logits = logits(list(range(len(t))))
    probs = target_probs(logits, temperature, top_p)
    node, path = 0, [0]
    while True:
        kids = [c for c in range(1, len(t)) if t.parents[c] == node]
        for c in kids:
            if torch.rand((), generator=generator, dtype=torch.float64) < probs[node, t.tokens[c]]:
                node = c
                path.append(c)
                break
        else:
            return path, int(torch.multinomial(probs[node].float(), 1, generator=generator))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_matches_target(temperature, top_p):
    p, tv = run(accept_sampling, temperature, top_p)
    assert p > 1e-3, f"chi-square p={p:.2e}, TV={tv:.4f}"
    assert tv < 0.06


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_broken_rule_is_detected(temperature, top_p):
    p, _ = run(broken_no_residual, temperature, top_p)
    assert p < 1e-6, f"the broken rule passed the distribution test (p={p:.2e})"


def test_top_p_truncates():
    probs = target_probs(torch.tensor([[3.0, 2.0, 1.0, -5.0]]), 1.0, 0.6)
    assert probs[0, 2] == 0 and probs[0, 3] == 0 and abs(float(probs.sum()) - 1) < 1e-12
