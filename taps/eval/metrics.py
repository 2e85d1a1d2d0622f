"""Aggregates over decoded turns: tau, acceptance by depth, accepted-vs-rejected node stats.

tau is token-weighted over a benchmark: all new tokens divided by all target forwards (prefill
included), so vanilla decoding scores exactly 1.0. Per-question tau is kept for intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

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
