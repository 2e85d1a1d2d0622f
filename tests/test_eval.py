"""Aggregates and the lossless comparison used in results.json."""

from __future__ import annotations

import pytest

from taps.engine.stats import CycleStats, Generation
from taps.eval.metrics import acceptance_by_depth, node_stats, tau
from taps.eval.ties import LosslessError, check_lossless, compare, tie_threshold
from taps.report.files import identity, to_csv, to_markdown


def gen(accepted: list[int], new: int) -> Generation:
    cycles = [
        CycleStats(
            accepted=a,
            tree_size=6,
            drafter=0,
            draft_forwards=5,
            node_confidence=[0.9, 0.5],
            node_entropy=[1.0, 3.0],
            node_depth=[1, 2],
            node_accepted=[True, False],
        )
        for a in accepted
    ]
    return Generation(
        tokens=list(range(new)), target_forwards=1 + len(accepted), wall_time_s=1.0, cycles=cycles
    )


def test_tau_is_token_weighted_with_prefill():
    a, b = gen([2, 0, 1], 7), gen([4], 6)  # 1 + (3 + 1 + 2) = 7 tokens; 1 + 5 = 6 tokens
    assert tau([a]) == 7 / 4 and tau([b]) == 6 / 2
    assert tau([a, b]) == 13 / 6


def test_acceptance_by_depth_and_node_stats():
    g = gen([2, 0, 1, 4], 12)
    assert acceptance_by_depth([g], 5) == [0.75, 0.5, 0.25, 0.25, 0.0]
    s = node_stats([g])
    assert s["accepted_confidence"] == 0.9 and s["rejected_entropy"] == 3.0


def test_compare_classifies_divergences_by_the_precision_used():
    import torch

    bf16 = tie_threshold(torch.bfloat16, 20.0)
    f32 = tie_threshold(torch.float32, 20.0)
    assert bf16 / f32 == pytest.approx(
        torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float32).eps
    )
    assert tie_threshold(torch.float32, 0.1) == tie_threshold(torch.float32, 1.0)  # floor at 1
    ref = Generation(tokens=[5, 6, 7, 8], target_forwards=4, wall_time_s=0,
                     top2_gaps=[3.0, 2.0, f32 / 4, bf16 / 2], top1_logits=[20.0] * 4)  # fmt: skip
    spec = Generation(tokens=[5, 6, 9, 8], target_forwards=2, wall_time_s=0,
                      top2_gaps=[3.0, 2.0, f32 / 2, bf16 / 4], top1_logits=[20.0] * 4)  # fmt: skip
    assert compare(ref, ref, torch.float32, None) == {"identical": True}
    d = compare(spec, ref, torch.float32, None)
    assert d["position"] == 2 and d["near_tie"] and d["top2_gap"] == f32 / 4
    assert d["spec_top2_gap"] == f32 / 2 and d["threshold"] == pytest.approx(f32)
    spec.tokens = [5, 6, 7, 9]  # gaps within bf16's noise at |logit| 20, not float32's
    assert compare(spec, ref, torch.bfloat16, None)["near_tie"]
    assert not compare(spec, ref, torch.float32, None)["near_tie"]
    assert compare(spec, ref, torch.float32, bf16)["near_tie"]  # an absolute eval.near_tie
    wide = Generation([5, 9], 2, 0, [3.0, 4 * bf16], [20.0, 20.0])
    d = compare(wide, ref, torch.bfloat16, None)  # one computation preferred it clearly
    assert d["position"] == 1 and not d["near_tie"]


def test_tables_hold_every_row():
    rows = [
        {"variant": v, "bench": b, "temperature": t, "tau": 1.5 + i / 10}
        for i, (v, b, t) in enumerate(
            [("a", "gsm8k", 0.0), ("a", "mt_bench", 0.0), ("b", "gsm8k", 1.0)]
        )
    ]
    csv = to_csv(rows).splitlines()
    assert len(csv) == 4 and csv[0].startswith("variant,")
    md = to_markdown(rows)
    assert "tau at T=0" in md and "tau at T=1" in md and "1.60" in md and "1.70" in md


def _divergence(qid: str, near_tie: bool) -> dict:
    return dict(question_id=qid, turn=0, identical=False, position=7, top2_gap=2.5,
                spec_top2_gap=0.0, top1_logit=20.0, threshold=0.6, dtype="bfloat16",
                near_tie=near_tie)  # fmt: skip


def test_lossless_check_fails_on_a_clear_divergence_and_reports_near_ties():
    """Near-ties pass and are counted; a divergence where the target had a clear choice raises,
    naming the question, once even when a stream repeats it in a per-source row."""
    tie, real = _divergence("q1", True), _divergence("q2", False)
    check = {"checked_turns": 4, "identical_fraction": 0.5, "divergences": [tie, real]}
    assert identity(check) == "2/4 turns (1 near-tie, 1 NOT a near-tie)"
    assert identity({"checked_turns": 3, "identical_fraction": 1 / 3,
                     "divergences": [tie, tie]}) == "1/3 turns (2 near-ties)"  # fmt: skip
    assert identity({"checked_turns": 2, "identical_fraction": 1.0, "divergences": []}) == (
        "2/2 turns"
    )
    ok = {"variant": "v", "bench": "gsm8k", "temperature": 0.0,
          "lossless": {**check, "divergences": [tie]}}  # fmt: skip
    check_lossless([ok, {"variant": "v", "bench": "gsm8k", "temperature": 1.0}], "out/")
    assert identity({**check, "divergences": [real, real]}) == "2/4 turns (2 NOT near-ties)"
    rows = [{**ok, "bench": "stream", "cell": "c1", "lossless": check},
            {**ok, "bench": "stream/gsm8k", "cell": "c1", "lossless": check}]  # fmt: skip
    with pytest.raises(
        LosslessError, match=r"(?s)^1 greedy divergence.*out/.*question 'q2' turn 1"
    ):
        check_lossless(rows, "out/")
    two = [{**rows[0], "bench": "gsm8k", "cell": "c2"}, {**rows[0], "bench": "svamp", "cell": "c3"}]
    with pytest.raises(LosslessError, match=r"(?s)^2 greedy.*gsm8k question 'q2'.*svamp question"):
        check_lossless(two, "out/")  # the same question id in two benchmarks: two failures
