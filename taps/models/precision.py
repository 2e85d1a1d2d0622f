"""Which low precision pays on this machine. bfloat16 halves the work on GPUs and on CPUs with
native bf16 (AVX512-BF16, AMX), but CPUs without it (AVX2 only, e.g. AMD Zen 3) emulate it
about 80x slower than float32. Configs say `auto` and get what is fast here; the resolved
dtype, never `auto`, enters cache keys."""

from __future__ import annotations

import functools
import os
import time

import torch


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


@functools.cache
def bf16_is_fast(device_type: str = "cpu") -> bool:
    """True where bf16 is native: its matmuls within 10x of float32's. Native bf16 measures
    0.5-2.3x here (AVX512-BF16 without AMX: 1.7-2.3x), emulated bf16 about 80x, so the wide
    margin keeps the answer (it enters cache keys) the same in every process, even one that
    probes while another job loads the cores: at 3x, parallel jobs disagreed and trained two
    drafters. $TAPS_BF16=0/1 overrides the measurement (once per process)."""
    forced = os.environ.get("TAPS_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        times = []
        for _ in range(4):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(torch.bfloat16) < 10 * best(torch.float32)


def resolve_dtype(name: str | None, device: torch.device | str | None = None) -> str | None:
    """'auto' -> 'bfloat16' where it is fast on `device`, else 'float32'; other names as given."""
    if name != "auto":
        return name
    return "bfloat16" if bf16_is_fast(_device_type(device)) else "float32"


def resolve_precision(precision: str | int | None, accelerator: str | None = "cpu") -> str | int:
    """Lightning precision: 'auto' -> 'bf16-mixed' where bf16 is fast, else '32-true'."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = "cuda" if gpu else "cpu"
    return "bf16-mixed" if bf16_is_fast(device) else "32-true"


def cast_for_serving(
    name: str | None, target: torch.nn.Module, heads: list, exact: bool = False
) -> str | None:
    """Cast the target and draft heads to eval.dtype (resolving `auto`): training runs in its
    own precision, decoding in this one. `exact` (eval.exact) keeps the target in float32 and
    casts only the heads: greedy output is then the float32 target's, token for token.
    Returns the dtype name, or None (kept as loaded)."""
    serve = resolve_dtype(name, next(target.parameters()).device)
    if exact:
        target.to(torch.float32)
    if serve:
        dtype = getattr(torch, serve)
        for module in (*([] if exact else [target]), *heads):
            module.to(dtype)
    return serve
