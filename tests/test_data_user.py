"""The user's own training data: JSONL files in ShareGPT or OpenAI-messages records, hub
datasets, bad rows counted per reason with their first line, and mixtures and combinations of
them with the built-in sources."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from taps.data.conversations import DataError
from taps.data.drafters import drafter_data
from taps.data.mixture import build_mixture
from taps.data.user import component_label, load_hf, load_jsonl

SHAREGPT = {"conversations": [{"from": "human", "value": "What is 2+2?"},
                              {"from": "gpt", "value": "4."}]}  # fmt: skip
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]}]}  # fmt: skip


def write_user_file(path, bad: bool = True) -> None:
    """Both record formats, and one bad row of each kind the loader must count."""
    lines = [json.dumps(SHAREGPT).encode(), json.dumps(MESSAGES).encode()]
    if bad:
        lines += [
            b'{"messages": [oops',  # malformed JSON (line 3)
            '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"),
            json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
            json.dumps({"conversations": [{"from": "human", "value": "hi"}]}).encode(),
        ]
    lines += [json.dumps(SHAREGPT).encode()] * 2
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_both_record_formats_and_every_bad_row_counted(tmp_path, caplog):
    f = tmp_path / "mine.jsonl"
    write_user_file(f)
    with caplog.at_level(logging.WARNING, logger="taps.data.sources"):
        convs = load_jsonl(f, component_label({"source": "jsonl", "path": str(f)}))
    assert len(convs) == 4 and {c.source for c in convs} == {"jsonl-mine"}
    assert convs[1].messages[0] == {"role": "system", "content": "Be brief."}  # system kept
    assert convs[1].messages[2] == {"role": "assistant", "content": "Paris."}
    text = caplog.text
    assert f"{f}: kept 4, skipped 4 rows" in text
    for reason, line in (("malformed JSON", 3), ("not UTF-8", 4), ("unknown role", 5),
                         ("no assistant turn", 6)):  # fmt: skip
        assert f"{reason}: 1 (first at line {line})" in text, reason


def test_a_file_without_a_usable_row_is_an_error(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"oops\n{"messages": []}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable conversation \(.*malformed JSON"):
        load_jsonl(f, "jsonl-bad")
    with pytest.raises(DataError, match="is not a file"):
        load_jsonl(tmp_path / "missing.jsonl", "x")


def test_a_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub dataset me/my-chats, split train: the hub is not"):
        load_hf("me/my-chats", "train")


def test_mixture_of_a_user_file_and_a_builtin_source(tmp_path, data_dir):
    f = tmp_path / "mine.jsonl"
    write_user_file(f, bad=False)
    split = build_mixture(
        [{"source": "jsonl", "path": str(f), "examples": 3},
         {"source": "mathinstruct", "examples": 5}],
        data_dir, holdout=0, prefer="local",
    )  # fmt: skip
    assert set(split.info["shares"]) == {"jsonl-mine", "mathinstruct"}
    assert sum(c.source == "jsonl-mine" for c in split.train) == 3
    part = split.info["components"][0]
    assert part["fingerprint"].startswith("sha256:") and part["available"] == 4


@pytest.mark.parametrize(
    "comp,match",
    [({"source": "jsonl"}, "needs path"), ({"source": "jsonl", "path": "x", "nme": 1}, "nme"),
     ({"source": "hf", "name": "a/b", "format": "alpaca"}, "format='alpaca'"),
     ({"source": "csv", "path": "x"}, "is not one of")],
)  # fmt: skip
def test_bad_components_name_the_key(tmp_path, comp, match):
    with pytest.raises(DataError, match=match):
        build_mixture([comp], None)


def test_each_user_component_is_its_own_drafter_in_a_combination(tmp_path):
    f = tmp_path / "mine.jsonl"
    data = OmegaConf.create({
        "name": "mine_and_math", "budget": "cpu", "max_len": 128, "holdout": 0.02,
        "components": [{"source": "jsonl", "path": str(f), "examples": 10},
                       {"source": "mathinstruct", "examples": 20}],
    })  # fmt: skip
    mine, math = drafter_data(data, None, combines=True)
    assert mine.name == "jsonl-mine" and mine.components[0].path == str(f)
    assert math.name == "mathinstruct" and math.max_len == 128
