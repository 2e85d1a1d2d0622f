"""Linear layers whose CPU inference goes through oneDNN instead of the default kernels.

Decoding multiplies a few rows (1 token, a draft level, a verified tree) by large weights, so it
is bound by reading the weights. Two measured CPU paths (experiments/README.md, "Speed"):

- float32: MKL's sgemm takes 16 ms for 1 row of the SmolLM2 LM head (49152 x 576) and 33 ms for
  2-16 rows on AMD EPYC (AVX2), oneDNN 8.5 and 15-20 ms;
- bfloat16 on CPUs with native bf16: `F.linear` goes through oneDNN but re-lays the weight out
  on every call; a copy packed once (`_reorder_linear_weight`) gives the same outputs (bitwise
  on AMD EPYC Zen 5; another CPU's oneDNN may round the two layouts differently) at about half
  the time (the SmolLM2 target's 211 matmuls of one step: 25.8 -> 11.8 ms there), at the cost
  of keeping that copy beside the weight.

The decoders switch this on around their loops (`fast_linear()`); training and the feature pass
keep the default kernels, so cached features do not depend on it. `TAPS_ONEDNN=0` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

_AVAILABLE = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
# Only where F.linear itself runs bf16 through oneDNN does packing keep its numerics.
_BF16_PACKED = _AVAILABLE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
_state = threading.local()
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (its version, packed copy)


def onednn_wanted() -> bool:
    return _AVAILABLE and os.environ.get("TAPS_ONEDNN", "1") != "0"


@contextlib.contextmanager
def fast_linear(enabled: bool | None = None) -> Iterator[None]:
    """Within the block, CPU inference of `linear` uses oneDNN (where available)."""
    before = getattr(_state, "on", False)
    _state.on = onednn_wanted() if enabled is None else enabled and _AVAILABLE
    try:
        yield
    finally:
        _state.on = before


def packed_weight(weight: Tensor) -> Tensor:
    """The weight in oneDNN's blocked layout, packed once and again only after it changes."""
    key = (weight.data_ptr(), weight._version, weight.shape)
    hit = _packed.get(weight)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        _packed[weight] = hit
    return hit[1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, or oneDNN's inner product inside `fast_linear` (CPU, no autograd): float32
    weights as they are, bfloat16 weights packed (on CPUs with native bf16)."""
    if getattr(_state, "on", False) and x.device.type == "cpu" and not torch.is_grad_enabled():
        if x.dtype == weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        # Inference tensors keep no version counter, so a packed copy could not follow them.
        if _BF16_PACKED and x.dtype == weight.dtype == torch.bfloat16 and not weight.is_inference():
            w = packed_weight(weight)
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that routes through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
