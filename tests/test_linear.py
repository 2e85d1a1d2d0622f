"""The oneDNN linear path (taps/models/linear.py): float32 and bfloat16 (packed weights) the same
as F.linear up to float noise, used only inside fast_linear for CPU inference, and lossless
decoding through it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.eval.ties import compare
from taps.models import linear as L
from tests.helpers import NoisyOracle

needs_onednn = pytest.mark.skipif(not L._AVAILABLE, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 7, 60])
def test_onednn_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    x = torch.randn(1, rows, 64, generator=g)
    with torch.no_grad(), L.fast_linear(True):
        got = L.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_fast_path_only_where_it_is_safe(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise if L._AVAILABLE else None
    monkeypatch.setattr(L, "_AVAILABLE", True)
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a), raising=False
    )
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4)
    L.linear(x, w)  # outside fast_linear
    with L.fast_linear(True):
        L.linear(x, w)  # autograd on: training must keep F.linear's gradients
        L.linear(x.bfloat16(), w.bfloat16())  # the same for bf16 training
        with torch.no_grad():
            L.linear(x.double(), w.double())  # float64 (exactness tests): default kernels
    with L.fast_linear(False), torch.no_grad():
        L.linear(x, w)
    assert calls == []
    if real is not None:
        with L.fast_linear(True), torch.no_grad():
            L.linear(x, w)
        assert calls == [1]


@pytest.mark.parametrize(
    ("out", "inp", "bias"), [(300, 64, False), (96, 40, True), (1000, 64, False)]
)
def test_bf16_inside_fast_linear_matches_f_linear(out, inp, bias):
    """On CPUs with native bf16 the weight is packed once; the result is F.linear's to bf16
    rounding (bitwise on the Zen 5 where it was measured; another CPU's oneDNN may pick other
    kernels for the two layouts). A wrong or stale packed weight is off by whole units."""
    g = torch.Generator().manual_seed(out)
    w = torch.randn(out, inp, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    for shape in [(1, 1), (1, 7), (1, 16), (3, 1), (2, 5), (1, 61)]:
        x = torch.randn(*shape, inp, generator=g).bfloat16()
        with torch.no_grad(), L.fast_linear(True):
            got = L.linear(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1.6e-2, atol=1e-2)
    assert (w in L._packed) == L._BF16_PACKED  # fast_linear(True) is on whatever TAPS_ONEDNN says


def test_a_changed_bf16_weight_is_packed_again():
    """The packed copy follows in-place updates and re-assigned data (a stale copy would decode
    with the old weights)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 32, generator=g).bfloat16()
    x = torch.randn(1, 4, 32, generator=g).bfloat16()
    with torch.no_grad(), L.fast_linear(True):
        L.linear(x, w)
        w.mul_(-2)
        torch.testing.assert_close(L.linear(x, w), F.linear(x, w), rtol=1.6e-2, atol=1e-2)
        w.data = torch.randn(200, 32, generator=g).bfloat16()
        torch.testing.assert_close(L.linear(x, w), F.linear(x, w), rtol=1.6e-2, atol=1e-2)


def test_an_inference_tensor_weight_is_not_packed():
    """A weight made under torch.inference_mode has no version counter to follow: F.linear."""
    with torch.inference_mode():
        w = torch.randn(64, 16).bfloat16()
    x = torch.randn(1, 3, 16).bfloat16()
    with torch.no_grad(), L.fast_linear(True):
        assert torch.equal(L.linear(x, w), F.linear(x, w))
    assert w not in L._packed


def test_bf16_decoding_through_packed_weights_is_lossless(tiny64, monkeypatch):
    """A bf16 copy of the tiny target: speculative greedy through packed weights decodes the
    tokens of vanilla greedy (packed), and vanilla packed those of vanilla unpacked, except at a
    classified bf16 near-tie (taps/eval/ties.py)."""
    model = copy.deepcopy(tiny64.model).bfloat16()
    g = torch.Generator().manual_seed(1)
    available, same = L._BF16_PACKED, 0
    for _ in range(3):
        p = torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist()
        monkeypatch.setattr(L, "_BF16_PACKED", False)
        plain = vanilla_generate(model, p, 24, set())
        monkeypatch.setattr(L, "_BF16_PACKED", available)
        packed = vanilla_generate(model, p, 24, set())
        oracle = NoisyOracle(model, depth=4, noise=0.3, seed=2)
        spec = SpeculativeDecoder(model, oracle, set()).generate(p, 24)
        for a, b in ((spec, packed), (packed, plain)):
            verdict = compare(a, b, torch.bfloat16, None)
            assert verdict["identical"] or verdict["near_tie"], verdict
        same += spec.tokens == packed.tokens == plain.tokens
    assert same >= 2  # near-ties are rare: mostly identical outright


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("TAPS_ONEDNN", "0")
    assert not L.onednn_wanted()


@needs_onednn
def test_float32_decoding_through_onednn_is_lossless(tiny64):
    """Float32 copy of the tiny target: speculative and vanilla greedy (both through the fast
    kernels) agree token for token except where the target's top-2 logits nearly tie."""
    model = copy.deepcopy(tiny64.model).float()  # the shared fixture stays float64
    g = torch.Generator().manual_seed(5)
    same = 0
    for _ in range(4):
        p = torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist()
        ref = vanilla_generate(model, p, 24, set())
        oracle = NoisyOracle(model, depth=4, noise=0.3, seed=2)
        out = SpeculativeDecoder(model, oracle, set()).generate(p, 24)
        n = next(
            (i for i, (a, b) in enumerate(zip(out.tokens, ref.tokens, strict=True)) if a != b), None
        )
        assert n is None or ref.top2_gaps[n] < 1e-3, f"diverged at {n}, gap {ref.top2_gaps[n]}"
        same += n is None
    assert same >= 3  # near-ties are rare: mostly identical outright
