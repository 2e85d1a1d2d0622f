"""The oneDNN linear path (taps/models/linear.py): same results as F.linear up to float noise,
used only inside fast_linear for float32 CPU inference, and lossless decoding through it."""

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
        with torch.no_grad():
            L.linear(x.double(), w.double())  # float64 (exactness tests): default kernels
    with L.fast_linear(False), torch.no_grad():
        L.linear(x, w)
    assert calls == []
    if real is not None:
        with L.fast_linear(True), torch.no_grad():
            L.linear(x, w)
        assert calls == [1]


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
