"""Aggregates over decoded turns: tau, acceptance by depth, accepted-vs-rejected node stats.

tau is token-weighted over a benchmark: all new tokens divided by all target forwards (prefill
included), so vanilla decoding scores exactly 1.0. Per-question tau is kept for intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taps.engine.stats import Generation


def tau(gens: Sequence[Generation]) -> float:
    forwards = sum(g.target_forwards for g in gens)
    return sum(len(g.tokens) for g in gens) / max(forwards, 1)


def acceptance_by_depth(gens: Sequence[Generation], max_depth: int) -> list[float]:
    """Fraction of decoding cycles that accepted at least d draft tokens, d = 1..max_depth."""
    cycles = [c.accepted for g in gens for c in g.cycles]
    if not cycles:
        return [0.0] * max_depth
    return [sum(a >= d for a in cycles) / len(cycles) for d in range(1, max_depth + 1)]


def node_stats(gens: Sequence[Generation]) -> dict[str, float | None]:
    """Mean confidence and entropy of accepted versus rejected draft nodes."""
    acc: dict[str, list[float]] = {"confidence": [], "entropy": []}
    rej: dict[str, list[float]] = {"confidence": [], "entropy": []}
    for g in gens:
        for c in g.cycles:
            for conf, ent, ok in zip(
                c.node_confidence, c.node_entropy, c.node_accepted, strict=True
            ):
                side = acc if ok else rej
                side["confidence"].append(conf)
                side["entropy"].append(ent)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "accepted_confidence": mean(acc["confidence"]),
        "rejected_confidence": mean(rej["confidence"]),
        "accepted_entropy": mean(acc["entropy"]),
        "rejected_entropy": mean(rej["entropy"]),
    }


def bootstrap_taus(
    per_question: Sequence[Sequence[int]], samples: int = 2000, seed: int = 0
) -> torch.Tensor:
    """Bootstrap replicates [samples] of the token-weighted tau, resampling questions (each a
    (new tokens, target forwards) pair, all its turns together)."""
    data = torch.tensor(per_question, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(per_question), (samples, len(per_question)), generator=gen)
    picked = data[idx]  # [samples, questions, 2]
    return picked[..., 0].sum(1) / picked[..., 1].sum(1).clamp(min=1)


def percentile_interval(replicates: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=replicates.dtype)
    lo, hi = torch.quantile(replicates, q)
    return float(lo), float(hi)


def bootstrap_tau(
    per_question: Sequence[Sequence[int]], samples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of tau over questions; None for fewer than 2 questions."""
    if len(per_question) < 2:
        return None
    return percentile_interval(bootstrap_taus(per_question, samples, seed), level)


def routing_shares(
    per_question: dict[str, Sequence[Generation]], names: Sequence[str]
) -> dict[str, dict[str, float]] | None:
    """For routed strategies: the share of cycles whose verified tree came from each drafter,
    and the share of questions assigned to each by the paper's rule (the drafter with the best
    mean routing score over the question's routed cycles). None when nothing was routed."""
    cycles = [c for gens in per_question.values() for g in gens for c in g.cycles]
    if not any(c.route_scores for c in cycles):
        return None
    n = len(names)
    by_cycle = [sum(c.drafter == i for c in cycles) / len(cycles) for i in range(n)]
    by_question = [0] * n
    for gens in per_question.values():
        rows = [c.route_scores for g in gens for c in g.cycles if c.route_scores]
        if rows:
            means = [sum(r[i] for r in rows) / len(rows) for i in range(n)]
            by_question[max(range(n), key=means.__getitem__)] += 1
    total = max(sum(by_question), 1)
    return {
        "cycles": {name: round(x, 4) for name, x in zip(names, by_cycle, strict=True)},
        "questions": {
            name: round(x / total, 4) for name, x in zip(names, by_question, strict=True)
        },
    }
