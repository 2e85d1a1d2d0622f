"""The oneDNN linear path (taps/models/linear.py): float32 the same as F.linear up to float noise,
bfloat16 (packed weights) bitwise the same, used only inside fast_linear for CPU inference, and
lossless decoding through it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
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
def test_bf16_inside_fast_linear_is_bitwise_f_linear(out, inp, bias):
    """On CPUs with native bf16 the weight is packed once and must give exactly F.linear's
    outputs (the decoders' results do not depend on it); elsewhere F.linear itself runs."""
    g = torch.Generator().manual_seed(out)
    w = torch.randn(out, inp, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    for shape in [(1, 1), (1, 7), (1, 16), (3, 1), (2, 5), (1, 61)]:
        x = torch.randn(*shape, inp, generator=g).bfloat16()
        with torch.no_grad(), L.fast_linear(True):
            got = L.linear(x, w, b)
        assert torch.equal(got, F.linear(x, w, b)), shape
    assert (w in L._packed) == (L._BF16_PACKED and L.onednn_wanted())


def test_a_changed_bf16_weight_is_packed_again():
    """The packed copy follows in-place updates and re-assigned data (a stale copy would decode
    with the old weights)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 32, generator=g).bfloat16()
    x = torch.randn(1, 4, 32, generator=g).bfloat16()
    with torch.no_grad(), L.fast_linear(True):
        L.linear(x, w)
        w.mul_(-2)
        assert torch.equal(L.linear(x, w), F.linear(x, w))
        w.data = torch.randn(200, 32, generator=g).bfloat16()
        assert torch.equal(L.linear(x, w), F.linear(x, w))


def test_bf16_packing_leaves_decoding_unchanged(tiny64, monkeypatch):
    """A bf16 copy of the tiny target decodes the same tokens, cycle for cycle, with and without
    packed weights (packing changes no rounding)."""
    model = copy.deepcopy(tiny64.model).bfloat16()
    p = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    runs = []
    for packed in (True, False):
        monkeypatch.setattr(L, "_BF16_PACKED", packed and L._BF16_PACKED)
        oracle = NoisyOracle(model, depth=4, noise=0.3, seed=2)
        out = SpeculativeDecoder(model, oracle, set()).generate(p.tolist(), 24)
        runs.append((out.tokens, [c.accepted for c in out.cycles]))
        runs.append(vanilla_generate(model, p.tolist(), 24, set()).tokens)
    assert runs[0] == runs[2] and runs[1] == runs[3]


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
