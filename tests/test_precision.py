"""`auto` precision: bf16 only where it is fast, and never `auto` in a cache key."""

from __future__ import annotations

import pytest

from taps.models import precision


@pytest.fixture(autouse=True)
def fresh_probe():
    precision.bf16_is_fast.cache_clear()
    yield
    precision.bf16_is_fast.cache_clear()


@pytest.mark.parametrize("forced,dtype,mixed", [("1", "bfloat16", "bf16-mixed"),
                                                ("0", "float32", "32-true")])  # fmt: skip
def test_override_decides(monkeypatch, forced, dtype, mixed):
    monkeypatch.setenv("TAPS_BF16", forced)
    assert precision.resolve_dtype("auto") == dtype
    assert precision.resolve_precision("auto", "cpu") == mixed


def test_explicit_values_pass_through(monkeypatch):
    monkeypatch.setenv("TAPS_BF16", "0")
    assert precision.resolve_dtype("bfloat16") == "bfloat16"
    assert precision.resolve_dtype(None) is None
    assert precision.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_probe_agrees_with_resolution(monkeypatch):
    monkeypatch.delenv("TAPS_BF16", raising=False)
    fast = precision.bf16_is_fast("cpu")
    assert precision.resolve_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")


def test_auto_never_reaches_the_drafter_key(monkeypatch, tmp_path):
    """Two machines that resolve `auto` differently must not share a drafter cache entry."""
    from omegaconf import OmegaConf

    from taps.training.train import _resolved_trainer

    t = OmegaConf.create({"precision": "auto", "accelerator": "auto"})
    monkeypatch.setenv("TAPS_BF16", "1")
    assert _resolved_trainer(t).precision == "bf16-mixed"
    precision.bf16_is_fast.cache_clear()
    monkeypatch.setenv("TAPS_BF16", "0")
    assert _resolved_trainer(t).precision == "32-true"
