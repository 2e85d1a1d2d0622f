"""Cached evaluation cells. One cell is one benchmark at one temperature for one decoder; its
row is stored under a content key, so a re-run, or a sweep resumed after an interrupt,
decodes only the cells that are missing and a cell shared by two experiments is decoded once.

The key covers everything that can change a row: the target's weights, each drafter's cache
key, the strategy and its options, the tree, the prompts themselves, the decoding settings,
and a digest of the source code that produces a row (engine, strategies, models, metrics), so
editing any of it invalidates the cells instead of serving stale numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from taps.paths import atomic_write_text, content_key, hash_source_files

CELL_VERSION = "cell-v1"
# Source files whose behaviour a cached row depends on.
_CODE = ("taps/engine", "taps/combine", "taps/models", "taps/eval/evaluate.py",
         "taps/eval/metrics.py", "taps/data/template.py", "taps/data/benchmarks.py")  # fmt: skip


@functools.cache
def code_digest() -> str:
    h = hashlib.sha256()
    hash_source_files(h, list(_CODE), (".py",))
    return h.hexdigest()[:16]


def cell_key(**parts: object) -> str:
    return content_key(CELL_VERSION, code_digest(), parts, length=20)


def cell_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "cells" / f"{key}.json"


def load_cell(cache_dir: str | Path, key: str) -> dict | None:
    """The stored row, or None if missing or unreadable (then it is decoded again)."""
    path = cell_path(cache_dir, key)
    try:
        return json.loads(path.read_text())["row"]
    except (OSError, ValueError, KeyError):
        return None


def store_cell(cache_dir: str | Path, key: str, row: dict, parts: dict) -> None:
    doc = {"key": key, "parts": parts, "row": row}
    atomic_write_text(cell_path(cache_dir, key), json.dumps(doc, default=str))
