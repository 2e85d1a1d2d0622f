"""Hardened inputs and determinism (issue 8, items 3 and 4): every bad input gives one clear
error naming the file, line or config key (or a counted warning for skippable training rows),
no failure leaves a half-written cache entry or results file, and the same seed and config
give the same weights and the same sampled tokens."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import taps.paths
import taps.report.files as report
import taps.training.features as features_mod
from taps.data.benchmarks import BenchPrompt, load_benchmark
from taps.data.conversations import Conversation, DataError
from taps.data.sources import load_source, parse_sharegpt_json
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.eval.evaluate import run_bench
from taps.models.draft_head import DraftHead
from taps.models.heads import load_head, save_head
from taps.models.llama import Llama
from taps.paths import atomic_dir, atomic_write_text, default_data_dir
from taps.training.features import cached_features, compute_features
from tests.helpers import TopKOracle
from tests.test_training import train_tiny


def _lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _qa(q: str, a: str) -> str:
    return json.dumps({"question": q, "answer": f"{a}\n#### {a}"})


def _conv(cid: str, *turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple({"role": r, "content": c} for r, c in turns), "test", cid)


# ---------------------------------------------------------------- 1. malformed JSONL lines


def test_malformed_training_rows_are_skipped_with_a_count(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("TAPS_DATA_DIR", raising=False)
    path = _lines(
        tmp_path / "gsm8k" / "train.jsonl",
        [_qa("1+1?", "2"), "{oops", _qa("2+2?", "4"), "[1, 2]", _qa("3+3?", "6")],
    )
    with caplog.at_level(logging.WARNING, logger="taps.data.sources"):
        convs, info = load_source("mathinstruct", tmp_path, prefer="local")
    assert [c.messages[0]["content"] for c in convs] == ["1+1?", "2+2?", "3+3?"]
    assert info.skipped == 2
    assert f"skipped 2 malformed rows in {path} (first at line 2)" in caplog.text
    # Every row bad: nothing to train on, so an error naming the file and first line.
    _lines(path, ["{oops", "not json"])
    with pytest.raises(DataError, match=r"train\.jsonl:1: no usable rows, 2 malformed"):
        load_source("mathinstruct", tmp_path, prefer="local")


def test_malformed_benchmark_line_is_an_error_naming_file_and_line(tmp_path):
    good = json.dumps({"question_id": 1, "turns": ["fine"]})
    path = _lines(tmp_path / "prompts.jsonl", [good, "{oops", good])
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: malformed JSON"):
        load_benchmark("jsonl", None, path=str(path))


# ---------------------------------------------------------------- 2. no assistant turn


def test_conversation_without_assistant_turn_is_a_counted_skip(tiny64, caplog):
    ok = _conv("ok", ("user", "What is 2+2?"), ("assistant", "It is 4."))
    lone = _conv("lone", ("user", "Anyone there?"))
    with caplog.at_level(logging.WARNING, logger="taps.training.features"):
        fs = compute_features(tiny64, [ok, lone, ok], max_len=64)
    assert len(fs) == 2 and fs.meta["skipped"] == 1
    assert "skipped 1 of 3 conversations: conversation has no assistant turn: 1" in caplog.text
    assert "first test/lone" in caplog.text
    with pytest.raises(DataError, match="no conversation had an assistant turn"):
        compute_features(tiny64, [lone], max_len=64)
    # ShareGPT rows without an assistant turn are counted by the source loader.
    rec = {"id": "a", "conversations": [{"from": "human", "value": "q"}]}
    col, _, _ = parse_sharegpt_json(json.dumps([rec]).encode(), Path("x.json"))
    assert col.skipped == 1 and col.why["no user or no assistant turn"] == 1


# ---------------------------------------------------------------- 3. empty prompts


@pytest.mark.parametrize("turns", [[""], ["ok", "   "], []])
def test_empty_benchmark_prompt_names_line_and_question(tmp_path, turns):
    good = json.dumps({"question_id": "q1", "turns": ["fine"]})
    bad = json.dumps({"question_id": "q7", "turns": turns})
    path = _lines(tmp_path / "prompts.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: .*question_id q7"):
        load_benchmark("jsonl", None, path=str(path))
    _lines(path, [json.dumps({"question_id": "q7"})])  # no turns at all
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: missing 'turns'.*question_id q7"):
        load_benchmark("jsonl", None, path=str(path))


def test_empty_token_prompt_is_a_value_error(tiny64):
    dec = SpeculativeDecoder(tiny64.model, TopKOracle(tiny64.model), set())
    with pytest.raises(ValueError, match="empty prompt"):
        dec.generate([], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        vanilla_generate(tiny64.model, [], 4, set())


# ---------------------------------------------------------------- 4. prompt past the context


def test_prompt_longer_than_context_is_a_clear_error(tiny64, monkeypatch):
    model = tiny64.model
    monkeypatch.setattr(model.config, "max_position_embeddings", 32)
    oracle = TopKOracle(model)
    dec = SpeculativeDecoder(model, oracle, set())
    prompt = [5] + list(range(10, 35))  # 26 tokens
    msg = r"prompt length 26 \+ max_new_tokens 8 = 34 exceeds the context of the target \(32"
    with pytest.raises(ValueError, match=msg):
        dec.generate(prompt, 8)
    with pytest.raises(ValueError, match=msg):
        vanilla_generate(model, prompt, 8, set())
    assert len(dec.generate(prompt, 6).tokens) <= 6  # 26 + 6 fits: fine
    long_q = BenchPrompt("long-1", "test", ("word " * 40,))
    with pytest.raises(ValueError, match=r"exceeds the context.*question_id 'long-1', turn 1"):
        run_bench(dec, tiny64.tokenizer, "mine", [long_q], 8, 0.0)


# ---------------------------------------------------------------- 5-6. head checkpoints


def _other_target(vocab: int, hidden: int) -> Llama:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return Llama(cfg).double().eval()


def test_checkpoint_for_another_target(tiny64, tmp_path, caplog):
    torch.manual_seed(0)
    head = DraftHead.for_target(tiny64.model)
    save_head(head, tmp_path / "full", {"target": {"name": "tiny-random", "key": tiny64.key}})
    with pytest.raises(ValueError, match=r"full: head was trained for a vocabulary of 1024"):
        load_head(tmp_path / "full", _other_target(vocab=512, hidden=64))
    with pytest.raises(ValueError, match=r"full: head hidden size 64 does not match.*32"):
        load_head(tmp_path / "full", _other_target(vocab=1024, hidden=32))
    # A draft-vocabulary head from before target_vocab was recorded: d2t ids decide.
    sub = DraftHead.for_target(tiny64.model, d2t=torch.arange(0, 1024, 2))
    save_head(sub, tmp_path / "sub", {})
    meta = json.loads((tmp_path / "sub" / "config.json").read_text())
    del meta["target_vocab"]
    (tmp_path / "sub" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"sub: head was trained for a vocabulary of > 1022"):
        load_head(tmp_path / "sub", _other_target(vocab=512, hidden=64))
    # Same shapes, other weights: a warning naming both keys, and the head loads.
    save_head(head, tmp_path / "other", {"target": {"name": "other-llama", "key": "abc123"}})
    with caplog.at_level(logging.WARNING, logger="taps.models.draft_head"):
        load_head(tmp_path / "other", tiny64.model)
        assert "other-llama (key abc123)" in caplog.text and tiny64.key in caplog.text
        caplog.clear()
        load_head(tmp_path / "full", tiny64.model)
        assert "trained on target" not in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_json"])
def test_corrupt_head_file_names_the_file(tiny64, tmp_path, damage):
    save_head(DraftHead.for_target(tiny64.model), tmp_path, {})
    weights = tmp_path / "head.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x00garbage" * 100)
        match = r"head\.safetensors: corrupt or unreadable safetensors"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        match = r"head\.safetensors: corrupt or unreadable safetensors"
    else:
        (tmp_path / "config.json").write_text("{not json")
        match = r"config\.json: not valid JSON"
    with pytest.raises(ValueError, match=match):
        load_head(tmp_path, tiny64.model)


# ---------------------------------------------------------------- 7. missing data dir


def test_missing_data_dir_names_the_setting(tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    monkeypatch.delenv("TAPS_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=rf"paths\.data_dir={nowhere}: data dir does not exist"):
        load_source("mathinstruct", nowhere, prefer="local")
    monkeypatch.setenv("TAPS_DATA_DIR", str(nowhere))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_data_dir() == str(nowhere)
    # A mistyped dir is an error, not a silent fall-back to the hub copy of GSM8K.
    with pytest.raises(DataError, match=rf"\$TAPS_DATA_DIR={nowhere}: data dir does not exist"):
        load_benchmark("gsm8k", default_data_dir())
    with pytest.raises(DataError, match=r"\$TAPS_DATA_DIR=.*TAPS_DATA_DIR or paths\.data_dir"):
        load_source("mathinstruct", default_data_dir(), prefer="local")


# ---------------------------------------------------------------- 8. atomic cache and results


def test_failed_feature_build_leaves_no_cache_entry(tiny64, tmp_path, monkeypatch):
    convs = [_conv("a", ("user", "What is 2+2?"), ("assistant", "It is 4."))]
    real_writer = features_mod.RowWriter

    class WriteThenDie(real_writer):
        def close(self):
            super().close()  # the features are on disk, meta.json is not yet
            raise KeyboardInterrupt  # Ctrl-C mid-write

    monkeypatch.setattr(features_mod, "RowWriter", WriteThenDie)
    with pytest.raises(KeyboardInterrupt):
        cached_features(tiny64, convs, tmp_path, max_len=64)
    assert list((tmp_path / "features").iterdir()) == []  # no entry, no temp dir
    monkeypatch.setattr(features_mod, "RowWriter", real_writer)
    fs = cached_features(tiny64, convs, tmp_path, max_len=64)
    entries = list((tmp_path / "features").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    assert fs.meta["key"] == entries[0].name and len(fs) == 1


def _row(tau: float) -> dict:
    return {"variant": "v", "bench": "b", "temperature": 0.0, "tau": tau}


def test_failed_results_write_leaves_no_half_written_file(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "results.json", json.dumps({"rows": [_row(1.5)]}))
    real_replace = taps.paths.os.replace

    def die_before_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(taps.paths.os, "replace", die_before_rename)
    with pytest.raises(OSError, match="disk full"):
        report.write_results(tmp_path, [_row(2.5)], {})
    monkeypatch.setattr(taps.paths.os, "replace", real_replace)
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["tau"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp leftovers

    def broken_csv(rows):
        raise RuntimeError("bug in the CSV writer")

    monkeypatch.setattr(report, "to_csv", broken_csv)
    with pytest.raises(RuntimeError):
        report.write_results(tmp_path, [_row(2.5)], {})
    # each file is whole: the new results.json parses, and no csv / temp file appeared
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["tau"] == 2.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs.jsonl", "results.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    """The temporary names (mkstemp 0600, mkdtemp 0700) must not make results and cache
    entries private: they get the mode a plain open() or mkdir() would give."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        with atomic_dir(tmp_path / "entry") as d:
            (d / "x").write_text("x")
            (d / "weights").write_text("w")
            (d / "weights").chmod(0o600)  # what safetensors' save_file leaves
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "f").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "results.json") == mode(plain / "f") == 0o666 & ~umask
    assert mode(tmp_path / "entry") == mode(plain) == 0o777 & ~umask
    assert mode(tmp_path / "entry" / "weights") == mode(plain / "f")


# ---------------------------------------------------------------- 9. determinism


def test_same_seed_same_trained_weights(tmp_path, cache_dir):
    """Two trainings from scratch (separate caches: features are recomputed too) on CPU."""
    head_a, meta_a = train_tiny(tmp_path / "a", cache_dir)
    head_b, meta_b = train_tiny(tmp_path / "b", cache_dir)
    assert meta_a["key"] == meta_b["key"] and meta_a["global_step"] > 0
    sa, sb = head_a.state_dict(), head_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # and the comparison can fail: one more epoch changes the weights
    head_c, _ = train_tiny(tmp_path / "c", cache_dir, "trainer.max_epochs=2")
    assert not torch.equal(sa["fc.weight"], head_c.state_dict()["fc.weight"])


def _decoder(tiny64) -> SpeculativeDecoder:
    torch.manual_seed(0)
    head = DraftHead.for_target(tiny64.model)
    return SpeculativeDecoder(tiny64.model, HeadDrafter(head, TreeSpec(4, 3, 16)), set())


def test_same_seed_same_sampled_tokens(tiny64):
    dec = _decoder(tiny64)
    prompt = [1, 57, 305, 12, 9, 401]

    def sample(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return dec.generate(prompt, 24, 1.0, 1.0, gen).tokens

    first = sample(11)
    assert sample(11) == first
    assert any(sample(s) != first for s in (12, 13, 14))  # really sampling

    prompts = [BenchPrompt("a", "t", ("Hello there", "And again?")), BenchPrompt("b", "t", ("Hi",))]

    def bench(seed: int) -> list[list[int]]:
        run = run_bench(dec, tiny64.tokenizer, "mine", prompts, 16, 1.0, seed=seed)
        return [t.gen.tokens for t in run.turns]

    tokens = bench(3)
    assert bench(3) == tokens and len(tokens) == 3
    assert bench(4) != tokens
