"""When a greedy divergence from vanilla decoding is floating-point noise, not a bug.

Tree verification and step-by-step decoding compute the same logits in different orders (and,
for several rows, with other matrix kernels), so their argmax can differ where the target's
top-2 logits are within rounding noise of each other. That noise follows the precision the
target runs in: about eps(dtype) x |logit| per rounding, accumulated over the layers. A
divergence is a near-tie when both computations' own top-2 gaps there are within

    threshold = TIE_EPS x eps(dtype) x max(|top-1 logit|, 1)

(eps: float32 1.2e-7, bfloat16 7.8e-3). TIE_EPS comes from a measurement: at every greedy
divergence of SmolLM2 in bf16 (EAGLE-3, paper tree, bench=all limit 5, 256 tokens: 17
divergences, experiments/README.md "Losslessness in bf16") the two computations' gaps summed
to at most 1.6 x eps x |top-1| (each gap alone: at most 1.1); TIE_EPS = 4 covers that with a
margin of 2.5: a threshold of 0.4-1.0 logits at |top-1| 13-33 in bf16.
`eval.near_tie` set to a number replaces the threshold by that absolute gap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from taps.engine.stats import Generation

if TYPE_CHECKING:  # torch loads in the functions: the entry point imports this before parsing
    import torch

TIE_EPS = 4.0


def tie_threshold(dtype: torch.dtype, top1: float) -> float:
    import torch

    return TIE_EPS * torch.finfo(dtype).eps * max(abs(top1), 1.0)


def compare(spec: Generation, ref: Generation, dtype: torch.dtype, near_tie: float | None) -> dict:
    """Token-for-token agreement of a greedy speculative generation with vanilla greedy
    decoding in the same precision; at the first divergence, both computations' top-2 gaps,
    the threshold the precision gives there (or the absolute `near_tie`) and the verdict."""
    a, b = spec.tokens, ref.tokens
    if a == b:
        return {"identical": True}
    pos = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    gap = ref.top2_gaps[pos] if pos < len(ref.top2_gaps) else None
    spec_gap = spec.top2_gaps[pos] if pos < len(spec.top2_gaps) else None
    top1 = ref.top1_logits[pos] if pos < len(ref.top1_logits) else None
    threshold = near_tie
    if threshold is None and top1 is not None:
        threshold = tie_threshold(dtype, top1)
    gaps = [g for g in (gap, spec_gap) if g is not None]
    return {
        "identical": False,
        "position": pos,
        "top2_gap": gap,  # vanilla decoding's gap at the divergence
        "spec_top2_gap": spec_gap,  # the verified row's gap there
        "top1_logit": top1,
        "threshold": threshold,
        "dtype": str(dtype).removeprefix("torch."),
        "near_tie": bool(gaps) and threshold is not None and max(gaps) <= threshold,
    }


class LosslessError(RuntimeError):
    """Greedy speculative decoding left vanilla decoding where the target had a clear choice:
    the decoding path is wrong, whatever else the run measured."""


def check_lossless(rows: list[dict], where: str) -> None:
    """Raise LosslessError naming every divergence (in rows' `lossless` checks) that is not a
    near-tie; `where` says where the results were kept for inspection."""
    bad: dict[tuple, str] = {}
    for r in rows:
        for d in (r.get("lossless") or {}).get("divergences", []):
            if d["near_tie"]:
                continue
            # a stream's per-source rows repeat its divergences and share its cell; benchmarks
            # may share question ids ("0"), never cells
            key = (r.get("cell") or r["bench"], r.get("variant"), r.get("temperature"),
                   d["question_id"], d["turn"])  # fmt: skip
            bad.setdefault(key, f"{r.get('variant')} {r['bench']} question {d['question_id']!r} "
                           f"turn {d['turn'] + 1}: token {d['position']} differs, top-2 gaps "
                           f"{d['top2_gap']} / {d['spec_top2_gap']} > {d['threshold']} "
                           f"({d['dtype']})")  # fmt: skip
    if bad:
        lines = "\n  ".join(list(bad.values())[:10])
        raise LosslessError(f"{len(bad)} greedy divergence(s) from vanilla decoding are not "
                            f"near-ties (results kept in {where}):\n  {lines}")  # fmt: skip
