"""Safetensors files written row by row and read row range by row range, never whole.

Cached features are the largest thing training touches (1 GB for 900k tokens of SmolLM2 in
bf16, four times that with EAGLE-3's auxiliary layers). Writing them as batches finish and
reading one example's rows at a time (os.pread) keeps them out of the process's memory: only
the page cache holds them, which the kernel can drop. The files are ordinary safetensors (the
header is written first, every tensor's size being known), so any safetensors reader opens them.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

_CODES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16",
          torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}  # fmt: skip
_DTYPES = {v: k for k, v in _CODES.items()}


class RowWriter:
    """A safetensors file of known tensor shapes; rows are written in any order."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        header: dict[str, dict] = {}
        self.where: dict[str, tuple[int, int, torch.dtype]] = {}  # name -> (start, row bytes)
        pos = 0
        for name, (dtype, shape) in specs.items():
            item = torch.empty((), dtype=dtype).element_size()
            row = item
            for d in shape[1:]:
                row *= d
            size = row * (shape[0] if shape else 1)
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                            "data_offsets": [pos, pos + size]}  # fmt: skip
            self.where[name] = (pos, row, dtype)
            pos += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes
        self.base = 8 + len(blob)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        os.write(self.fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(self.fd, self.base + pos)

    def write(self, name: str, first_row: int, rows: Tensor) -> None:
        start, row, dtype = self.where[name]
        data = rows.detach().to(dtype).contiguous().cpu()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        os.pwrite(self.fd, raw, self.base + start + first_row * row)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file; a cut file fails naming it."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    return header, 8 + n


class RowFile:
    """One 2-D tensor of a safetensors file, read by row ranges: `rf[a:b]` -> Tensor [b-a, w]."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path = str(path)
        header, base = read_header(path)
        if name not in header:
            raise ValueError(f"{path}: no tensor {name!r}")
        spec = header[name]
        self.dtype = _DTYPES[spec["dtype"]]
        self.shape = tuple(spec["shape"])
        self.start = base + spec["data_offsets"][0]
        self.row_bytes = torch.empty((), dtype=self.dtype).element_size() * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> Tensor:
        a, b, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("RowFile reads contiguous row ranges only")
        n = max(b - a, 0)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, n * self.row_bytes, self.start + a * self.row_bytes)
        finally:
            os.close(fd)
        if len(raw) != n * self.row_bytes:
            raise ValueError(f"{self.path}: cut short (rows {a}..{b} of {self.shape[0]})")
        if n == 0:
            return torch.empty(0, self.shape[1], dtype=self.dtype)
        return torch.frombuffer(bytearray(raw), dtype=self.dtype).view(n, self.shape[1])
