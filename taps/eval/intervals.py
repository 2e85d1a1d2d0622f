"""Intervals on comparisons of result rows: the mean tau over benchmarks with a bootstrap
interval, and the paired difference of two variants' means (both decoded the same questions,
so each bootstrap replicate resamples the same questions for both)."""

from __future__ import annotations

import torch

from taps.eval.metrics import bootstrap_taus, percentile_interval


def mean_with_ci(rows: list[dict]) -> tuple[float, tuple[float, float] | None]:
    """Mean tau over benchmarks; its interval resamples each benchmark's questions at once."""
    mean = sum(r["tau"] for r in rows) / len(rows)
    if not all(len(r.get("per_question") or {}) >= 2 for r in rows):
        return mean, None
    reps = torch.stack(
        [bootstrap_taus(list(r["per_question"].values()), seed=i) for i, r in enumerate(rows)]
    ).mean(0)
    return mean, percentile_interval(reps)


def mean_difference_ci(a: list[dict], b: list[dict]) -> tuple[float, tuple[float, float] | None]:
    """Mean tau of `a` minus that of `b` over their shared benchmarks, with a paired bootstrap
    interval: both decoded the same questions, so each replicate resamples the same questions
    for both, and the questions' own difficulty cancels out of the comparison."""
    ra, rb = {r["bench"]: r for r in a}, {r["bench"]: r for r in b}
    benches = sorted(ra.keys() & rb.keys())
    if not benches:
        raise ValueError("mean_difference_ci: the two variants share no benchmark")
    diff = sum(ra[x]["tau"] - rb[x]["tau"] for x in benches) / len(benches)
    reps = []
    for i, x in enumerate(benches):
        qa, qb = ra[x].get("per_question") or {}, rb[x].get("per_question") or {}
        if qa.keys() != qb.keys() or len(qa) < 2:
            return diff, None  # not the same questions: no paired interval
        qs = sorted(qa)
        # Same seed and question count -> bootstrap_taus draws the same indices for both.
        reps.append(
            bootstrap_taus([qa[q] for q in qs], seed=i)
            - bootstrap_taus([qb[q] for q in qs], seed=i)
        )
    return diff, percentile_interval(torch.stack(reps).mean(0))
