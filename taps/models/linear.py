"""Linear layers whose CPU inference can go through oneDNN instead of MKL's sgemm.

Decoding multiplies a few rows (1 token, a draft level, a verified tree) by large weights, so it
is bound by reading the weights. Measured on AMD EPYC (AVX2), torch 2.13, 2 threads, for the
SmolLM2 LM head (49152 x 576): MKL takes 16 ms for 1 row and 33 ms for 2-16 rows; oneDNN
8.5 ms and 15-20 ms (experiments/README.md). The decoders switch it on around their loops
(`fast_linear()`); training and the feature pass keep the default kernels, so cached
features do not depend on it. `TAPS_ONEDNN=0` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_AVAILABLE = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
_state = threading.local()


def onednn_wanted() -> bool:
    return _AVAILABLE and os.environ.get("TAPS_ONEDNN", "1") != "0"


@contextlib.contextmanager
def fast_linear(enabled: bool | None = None) -> Iterator[None]:
    """Within the block, float32 CPU inference of `linear` uses oneDNN (where available)."""
    before = getattr(_state, "on", False)
    _state.on = onednn_wanted() if enabled is None else enabled and _AVAILABLE
    try:
        yield
    finally:
        _state.on = before


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, or oneDNN's inner product inside `fast_linear` (float32, CPU, no autograd)."""
    if (
        getattr(_state, "on", False)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that routes through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
