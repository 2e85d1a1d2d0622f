"""experiments/stream_table.py: hedge rows named by the options that differ from the default,
the per-task oracle assembled question by question from the two specialists, and a refusal to
pair rows that decoded different prompts (a held-out stream beside the default one)."""

from __future__ import annotations

import pytest

from tests.helpers import experiment_script

st = experiment_script("stream_table")


def row(strategy: str, per_question: dict, data: str = "mix", **extra) -> dict:
    tokens, forwards = (sum(v[i] for v in per_question.values()) or 1 for i in (0, 1))
    return {"bench": "stream", "temperature": 0.0, "strategy": strategy, "routing": strategy,
            "data": data, "per_question": per_question, "tau": tokens / forwards,
            "prompts": len(per_question), "tree_tokens_per_cycle": 8.0, **extra}  # fmt: skip


QS = ["gsm8k/1", "mt_bench/81", "svamp/2"]


def test_hedge_rows_are_named_by_their_changed_options():
    assert st.name(row("hedge", {}, options=st.hedge_defaults())) == "hedge"
    changed = {**st.hedge_defaults(), "choose": "sample"}
    assert st.name(row("hedge", {}, options=changed)) == "hedge choose=sample"
    assert st.name(row("single", {}, data="sharegpt")) == "single(sharegpt)"


def test_oracle_takes_each_prompts_specialist():
    math = row("single", {"gsm8k/1": [30, 10], "mt_bench/81": [20, 20], "svamp/2": [9, 3]},
               data="mathinstruct")  # fmt: skip
    chat = row("single", {"gsm8k/1": [10, 10], "mt_bench/81": [40, 20], "svamp/2": [3, 3]},
               data="sharegpt")  # fmt: skip
    o = st.oracle([math, chat], "mathinstruct", "sharegpt")
    assert o["per_question"] == {"gsm8k/1": [30, 10], "mt_bench/81": [40, 20], "svamp/2": [9, 3]}
    assert o["tau"] == pytest.approx(79 / 33)
    assert o["source_tau"] == {"gsm8k": 3.0, "mt_bench": 2.0, "svamp": 3.0}


def test_table_pairs_rows_on_the_same_prompts_and_refuses_mixed_streams():
    opts = st.hedge_defaults()
    hedge = row("hedge", {q: [20, 10] for q in QS}, options=opts)
    bandit = row("bandit", {q: [15, 10] for q in QS})
    lines = st.table([hedge, bandit], 0.0, "mathinstruct", "sharegpt")
    bandit_line = next(x for x in lines if x.startswith("| bandit"))
    assert "+0.50" in bandit_line  # hedge 2.0 - bandit 1.5
    held_out = row("bandit", {q.replace("/", "/9"): [15, 10] for q in QS})
    with pytest.raises(ValueError, match="different prompts"):
        st.table([hedge, held_out], 0.0, "mathinstruct", "sharegpt")
