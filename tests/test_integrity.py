"""Integrity of every artefact: each cache entry is checked, byte for byte, against the digests
recorded when it was built, so a damaged target, feature file, drafter or result cell is an
error naming the file instead of a wrong result with exit code 0; and non-finite numbers are
refused where they arise (feature pass, training, decoding)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import taps.training.train as train_mod
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead
from taps.models.target import convert_gguf, weights_key
from taps.paths import (
    MANIFEST,
    IntegrityError,
    atomic_dir,
    read_verified_text,
    verify_entry,
    write_verified_text,
)
from taps.training.guards import FiniteLoss, check_finite_weights
from tests.test_training import train_tiny


def flip_middle_byte(path: Path) -> None:
    """Damage a file the way a bad disk or a stray write does: one byte in the middle, size and
    header intact."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_atomic_dir_writes_a_manifest_that_verify_checks(tmp_path):
    entry = tmp_path / "entry"
    with atomic_dir(entry) as tmp:
        (tmp / "a.bin").write_bytes(os.urandom(3 << 20))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    digests = verify_entry(entry, "a test entry")
    assert set(digests) == {"a.bin", "sub/b.json"}
    flip_middle_byte(entry / "a.bin")
    with pytest.raises(IntegrityError, match=r"a\.bin: a test entry changed since it was built"):
        verify_entry(entry, "a test entry")


def test_a_missing_file_or_manifest_is_named(tmp_path):
    entry = tmp_path / "entry"
    with atomic_dir(entry) as tmp:
        (tmp / "a.bin").write_bytes(b"x")
    (entry / "a.bin").unlink()
    with pytest.raises(IntegrityError, match=r"a\.bin: file of the entry is missing"):
        verify_entry(entry, "the entry")
    (entry / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=f"no readable {MANIFEST}.*delete {entry}"):
        verify_entry(entry, "the entry")


def test_the_target_key_covers_every_byte(tmp_path):
    """It hashed only the first and last MiB: a change in the middle went unnoticed."""
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(5 << 20))
    before = weights_key(tmp_path, [weights])
    flip_middle_byte(weights)
    assert weights_key(tmp_path, [weights]) != before


def test_a_damaged_converted_target_is_an_error(tmp_path):
    """The cache hit of a conversion checks the converted files before anyone loads them."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    out = None
    from taps.paths import content_key, file_digest

    out = tmp_path / "cache" / "targets" / f"model-{content_key('gguf', file_digest(gguf))}"
    with atomic_dir(out) as tmp:  # what a finished conversion leaves
        (tmp / "model.safetensors").write_bytes(os.urandom(3 << 20))
        (tmp / "config.json").write_text("{}")
    assert convert_gguf(gguf, tmp_path / "cache") == out
    flip_middle_byte(out / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors: the converted target changed"):
        convert_gguf(gguf, tmp_path / "cache")


def test_damaged_features_and_drafter_are_errors_not_cache_hits(tmp_path, cache_dir):
    head, meta = train_tiny(tmp_path, cache_dir)
    assert len(meta["weights_sha256"]) == 64  # cells are tied to these bytes
    entry = next((tmp_path / "drafters").iterdir())
    flip_middle_byte(entry / "head.safetensors")
    with pytest.raises(IntegrityError, match="head.safetensors: the cached drafter changed"):
        train_tiny(tmp_path, cache_dir)  # the process-wide memo checks the bytes too
    train_mod._RESOLVED.clear()
    with pytest.raises(IntegrityError, match="the cached drafter changed"):
        train_tiny(tmp_path, cache_dir)
    import shutil

    shutil.rmtree(entry)
    train_mod._RESOLVED.clear()
    feats = next(p for p in (tmp_path / "features").iterdir() if (p / MANIFEST).is_file())
    flip_middle_byte(feats / "features.safetensors")
    with pytest.raises(IntegrityError, match="features.safetensors: cached target features"):
        train_tiny(tmp_path, cache_dir)
    assert not list((tmp_path / "drafters").glob("*/head.safetensors"))


def test_verified_text_files(tmp_path):
    f = tmp_path / "regen.jsonl"
    write_verified_text(f, '{"a": 1}\n')
    assert read_verified_text(f, "regenerated conversations") == '{"a": 1}\n'
    f.write_text('{"a": 2}\n')
    with pytest.raises(IntegrityError, match="regenerated conversations changed"):
        read_verified_text(f, "regenerated conversations")
    (tmp_path / "regen.jsonl.sha256").unlink()
    with pytest.raises(IntegrityError, match="no digest file"):
        read_verified_text(f, "regenerated conversations")


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    """A SIGKILL mid-build left a hidden temporary directory (412 MB for the target) forever."""
    final = tmp_path / "entry"
    dead = tmp_path / f".entry.tmp-{2**22 + 12345}-abc"  # no such pid (pid_max is 2**22)
    alive = tmp_path / f".entry.tmp-{os.getpid()}-def"
    dead.mkdir()
    alive.mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and alive.exists() and (final / "x").is_file()


def test_training_stops_at_the_first_non_finite_loss():
    class Trainer:
        global_step, current_epoch = 7, 0

    FiniteLoss().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1.0)}, None, 0)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 7"):
        FiniteLoss().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(float("nan"))},
                                        None, 3)  # fmt: skip
    head = torch.nn.Linear(2, 2)
    check_finite_weights(head, "drafter x")
    head.weight.data[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="drafter x: parameter weight is non-finite"):
        check_finite_weights(head, "drafter x")


def test_nan_target_weights_fail_the_feature_pass_and_decoding(tmp_path, cache_dir):
    from taps.data.conversations import Conversation
    from taps.models.target import tiny_random
    from taps.training.features import compute_features

    target = tiny_random(cache_dir)
    with torch.no_grad():
        target.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    conv = Conversation(({"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}), "test", "0")  # fmt: skip
    with pytest.raises(FloatingPointError, match="non-finite features for training sequence"):
        compute_features(target, [conv], 64, "float32")
    head = DraftHead.for_target(target.model)
    dec = SpeculativeDecoder(target.model, HeadDrafter(head, TreeSpec(2, 2, 6)), set())
    with pytest.raises(FloatingPointError, match="non-finite at prefill"):
        dec.generate([1, 2, 3], 4)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path, caplog, monkeypatch):
    """One bad byte: a raw UnicodeDecodeError without the file, fatal even for training."""
    import logging

    from taps.data.benchmarks import load_benchmark
    from taps.data.conversations import DataError
    from taps.data.sources import load_source

    good = json.dumps({"question_id": 1, "turns": ["fine"]}).encode()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(good + b"\n" + b'{"question_id": 2, "turns": ["caf\xe9"]}\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: not UTF-8"):
        load_benchmark("jsonl", None, path=str(prompts))
    monkeypatch.delenv("TAPS_DATA_DIR", raising=False)
    train = tmp_path / "gsm8k" / "train.jsonl"
    train.parent.mkdir()
    row = json.dumps({"question": "1+1?", "answer": "2\n#### 2"}).encode()
    train.write_bytes(row + b"\n" + b'{"question": "\xff"}\n' + row + b"\n")
    with caplog.at_level(logging.WARNING, logger="taps.data.sources"):
        convs, info = load_source("mathinstruct", tmp_path, prefer="local")
    assert len(convs) == 2 and info.skipped == 1
    assert f"skipped 1 malformed rows in {train} (first at line 2)" in caplog.text


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    import taps.paths
    from taps.paths import atomic_write_text

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(taps.paths.os, "replace", full)
    with pytest.raises(OSError, match=r"results\.json: could not write \(No space left"):
        atomic_write_text(tmp_path / "results.json", "{}")
    with pytest.raises(OSError, match=r"entry: could not build the cache entry \(No space"):
        with atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "x").write_text("1")


def test_a_process_waiting_on_a_lock_says_so(tmp_path, caplog):
    import fcntl
    import logging
    import threading

    from taps.paths import file_lock

    lock = tmp_path / "locks" / "drafter-x"
    lock.parent.mkdir()
    holder = open(lock, "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(0.3, lambda: fcntl.flock(holder, fcntl.LOCK_UN)).start()
    with caplog.at_level(logging.INFO, logger="taps"), file_lock(lock, "drafter x"):
        pass
    holder.close()
    assert f"waiting for drafter x: another process holds {lock}" in caplog.text


def test_truncated_files_of_a_local_target_are_named(tmp_path):
    """A user's Hugging Face directory (no manifest): a cut config.json or weight file fails
    naming the file, not as a bare JSONDecodeError or SafetensorError."""
    from transformers import LlamaConfig

    from taps.models.target import load_local

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable"):
        load_local(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises((OSError, ValueError), match=r"config\.json"):  # transformers names it
        load_local(tmp_path)
