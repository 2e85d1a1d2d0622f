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


def test_exact_mode_keeps_the_target_in_float32_and_stays_lossless(cache_dir):
    """eval.exact: the heads run in bf16, the target (verification and the vanilla reference)
    in float32, so greedy output is the float32 target's, token for token."""
    import torch

    from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
    from taps.engine.drafting import HeadDrafter, TreeSpec
    from taps.models.draft_head import DraftHead
    from taps.models.target import tiny_random
    from tests.test_engine_greedy import prompts

    target = tiny_random(cache_dir)
    torch.manual_seed(0)
    head = DraftHead.for_target(target.model).eval()
    assert precision.cast_for_serving("bfloat16", target.model, [head], exact=True) == "bfloat16"
    assert target.model.lm_head.weight.dtype == torch.float32
    assert head.fc.weight.dtype == torch.bfloat16
    dec = SpeculativeDecoder(target.model, HeadDrafter(head, TreeSpec(4, 3, 16)), target.eos_ids)
    for p in prompts(3, target.model.config.vocab_size, seed=2):
        ref = vanilla_generate(target.model, p, 24, target.eos_ids)
        assert dec.generate(p, 24).tokens == ref.tokens
    precision.cast_for_serving("bfloat16", target.model, [head])  # without exact: all bf16
    assert target.model.lm_head.weight.dtype == torch.bfloat16
