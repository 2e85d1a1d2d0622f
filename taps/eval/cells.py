"""Cached evaluation cells. One cell is one benchmark at one temperature for one decoder; its
row is stored under a content key, so a re-run, or a sweep resumed after an interrupt,
decodes only the cells that are missing and a cell shared by two experiments is decoded once.

The key covers everything that can change a row: the target's weights, each drafter's cache
key, the strategy and its options, the tree, the prompts themselves, the decoding settings,
a digest of the source code that produces a row (engine, strategies, models, metrics), so
editing any of it invalidates the cells instead of serving stale numbers, and the machine that
timed it (processor, threads, linear kernels: taps/eval/grid.py `machine`), since tokens/s are
measured, not derived.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from taps.paths import IntegrityError, atomic_write_text, content_key, hash_source_files

CELL_VERSION = "cell-v2"  # v2: a digest of parts and row in every cell
# Source files whose behaviour a cached row depends on.
_CODE = ("taps/engine", "taps/combine", "taps/models", "taps/eval/evaluate.py",
         "taps/eval/metrics.py", "taps/eval/ties.py", "taps/data/template.py",
         "taps/data/benchmarks.py")  # fmt: skip


@functools.cache
def code_digest() -> str:
    h = hashlib.sha256()
    hash_source_files(h, list(_CODE), (".py",))
    return h.hexdigest()[:16]


def cell_key(**parts: object) -> str:
    return content_key(CELL_VERSION, code_digest(), parts, length=20)


def cell_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "cells" / f"{key}.json"


def _digest(parts: object, row: object, outputs: object) -> str:
    doc = {"parts": parts, "row": row, "outputs": outputs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def load_cell(cache_dir: str | Path, key: str) -> tuple[dict, list[dict]] | None:
    """The stored (row, outputs), or None if the cell was never decoded. A cell whose content
    is not what was stored (edited, truncated, unreadable) is an IntegrityError naming the
    file: a row that cannot be vouched for is neither served nor silently decoded over."""
    path = cell_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        digest = _digest(doc["parts"], doc["row"], doc["outputs"])
        ok = doc["key"] == key and doc["sha256"] == digest
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{path}: cached result cell unreadable ({e}): delete it to "
                             "decode it again") from None  # fmt: skip
    if not ok:
        raise IntegrityError(f"{path}: cached result cell changed since it was decoded (its "
                             "digest does not match): delete it to decode it again")  # fmt: skip
    return doc["row"], doc["outputs"]


def store_cell(
    cache_dir: str | Path, key: str, row: dict, parts: dict, outputs: list[dict] | None = None
) -> None:
    """Store a decoded cell: its row, the generated texts and a digest of both with the parts."""
    # Through JSON first, so the digest covers exactly what a later load reads back.
    parts, row, outputs = json.loads(json.dumps([parts, row, outputs or []], default=str))
    doc = {"key": key, "parts": parts, "row": row, "outputs": outputs,
           "sha256": _digest(parts, row, outputs)}  # fmt: skip
    atomic_write_text(cell_path(cache_dir, key), json.dumps(doc))
