"""Peak memory of a block of work: GPU memory allocated by torch, or the process's resident set
on the CPU (sampled by a thread, since Linux keeps only one lifetime peak per process)."""

from __future__ import annotations

import functools
import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_mb` (the highest level reached) and
    `m.extra_mb` (the peak above the level at entry: what the block itself needed)."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    @property
    def extra_mb(self) -> float:
        return round(max(self.peak - self.start, 0) / 2**20, 1)

    def as_dict(self) -> dict:
        kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        return {"kind": kind, "peak_mb": self.peak_mb, "extra_mb": self.extra_mb}


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache  # find_library runs ldconfig in a subprocess: look it up once
def _libc():  # noqa: ANN202 (ctypes handle or None)
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "mallopt") else None


def limit_heap_growth(mmap_threshold: int = 1 << 20) -> bool:
    """Allocations of at least `mmap_threshold` bytes get their own mapping, returned to the
    system when freed. glibc otherwise raises this threshold up to 32 MB as tensors are freed,
    so training's variable-shaped tensors fill the heap with fragments it never returns.
    Measured (experiments/train_throughput.py --mmap-mb 1): process peak 3.86 -> 3.12
    GB but 36% slower training, so training does not call it. False where this is not glibc."""
    lib = _libc()
    if lib is None:
        return False
    ok = lib.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return ok and lib.mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold) == 1


def release_memory() -> None:
    """Give freed heap memory back to the system (between training and decoding)."""
    import gc

    gc.collect()
    lib = _libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)
