"""Benchmark prompt loading from the offline data folder and user files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taps.data.benchmarks import BENCHMARKS, load_benchmark
from taps.data.conversations import DataError

COUNTS = {"mt_bench": 80, "gsm8k": 1319, "math500": 500, "svamp": 300}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_counts_and_turns(data_dir: Path, name: str):
    prompts = load_benchmark(name, data_dir)
    assert len(prompts) == COUNTS[name]
    assert len({p.question_id for p in prompts}) == len(prompts)
    want_turns = 2 if name == "mt_bench" else 1
    for p in prompts:
        assert len(p.turns) == want_turns and all(t.strip() for t in p.turns)
        assert isinstance(p.question_id, str) and p.category


def test_first_prompts_match_files(data_dir: Path):
    mt = load_benchmark("mt_bench", data_dir)[0]
    assert mt.question_id == "81" and mt.category == "writing"
    assert mt.turns[1].startswith("Rewrite your previous response")
    gsm = load_benchmark("gsm8k", data_dir)[0]
    assert gsm.turns[0].startswith("Janet’s ducks lay 16 eggs per day")
    math = load_benchmark("math500", data_dir)[0]
    assert math.question_id == "test/precalculus/807.json"
    svamp = load_benchmark("svamp", data_dir)
    assert svamp[0].category == "svamp" and svamp[-1].question_id == "299"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_limit_takes_first_in_file_order(data_dir: Path, name: str):
    assert load_benchmark(name, data_dir, limit=7) == load_benchmark(name, data_dir)[:7]
    assert load_benchmark(name, data_dir, limit=0) == []


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_user_jsonl(tmp_path: Path):
    path = _write(
        tmp_path,
        [
            json.dumps({"question_id": 7, "category": "code", "turns": ["a", "b", "c"]}),
            "",
            json.dumps({"question_id": "x", "turns": ["only one"]}),
        ],
    )
    prompts = load_benchmark("jsonl", None, path=str(path))
    assert [p.question_id for p in prompts] == ["7", "x"]
    assert prompts[0].turns == ("a", "b", "c") and prompts[0].category == "code"
    assert prompts[1].category == "mine"  # no category: the file's stem
    assert load_benchmark("jsonl", None, path=str(path), limit=1) == prompts[:1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "malformed JSON"),
        (json.dumps([1, 2]), "JSON object"),
        (json.dumps({"question_id": 2}), "missing 'turns'"),
        (json.dumps({"question_id": 2, "turns": []}), "non-empty list"),
        (json.dumps({"question_id": 2, "turns": "hello"}), "non-empty list"),
        (json.dumps({"question_id": 2, "turns": ["ok", "  "]}), "empty or non-string"),
        (json.dumps({"question_id": 1, "turns": ["dup"]}), "duplicate question_id"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, message: str):
    good = json.dumps({"question_id": 1, "turns": ["fine"]})
    path = _write(tmp_path, [good, "", bad, good])
    with pytest.raises(DataError, match=rf"mine\.jsonl:3: .*{message}"):
        load_benchmark("jsonl", None, path=str(path))


def test_gsm8k_format_errors_name_line(tmp_path: Path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "1+1?", "answer": "2"}, {"answer": "no question"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl:2: field 'question'"):
        load_benchmark("gsm8k", tmp_path)


def test_bad_names_and_missing_files(tmp_path: Path, monkeypatch):
    with pytest.raises(DataError, match="mt_bench, gsm8k, math500, svamp, jsonl"):
        load_benchmark("humaneval", tmp_path)
    with pytest.raises(DataError, match="needs a path"):
        load_benchmark("jsonl", tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_benchmark("jsonl", tmp_path, path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"svamp/taps_test300\.jsonl.*TAPS_DATA_DIR"):
        load_benchmark("svamp", tmp_path)
    with pytest.raises(DataError, match=r"mt_bench/question\.jsonl"):
        load_benchmark("mt_bench", None)
    # GSM8K falls back to the hub, which is off here: the error names both
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl.*openai/gsm8k"):
        load_benchmark("gsm8k", tmp_path)
