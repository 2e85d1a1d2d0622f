"""Where things live: the offline data dir, the artefact cache, atomic writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    """$TAPS_DATA_DIR, else ../shared/data beside the checkout, else '' (hub only)."""
    env = os.environ.get("TAPS_DATA_DIR")
    if env:
        return env
    shared = REPO_ROOT.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else ""


def default_cache_dir() -> str:
    """$TAPS_CACHE_DIR, else .cache/ in the checkout (ignored by git)."""
    return os.environ.get("TAPS_CACHE_DIR") or str(REPO_ROOT / ".cache")


def content_key(*parts: Any, length: int = 16) -> str:
    """A short hash of JSON-serialisable parts: the cache key of an artefact."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def hash_source_files(h: hashlib._Hash, entries: list[str], suffixes: tuple[str, ...]) -> None:
    """Feed `h` the repo-relative path and bytes of every file with one of `suffixes` under
    each entry (a file or a folder of the checkout), in a stable order."""
    for entry in entries:
        path = REPO_ROOT / entry
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file() and f.suffix in suffixes:
                h.update(f.relative_to(REPO_ROOT).as_posix().encode())
                h.update(f.read_bytes())


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def umasked(mode: int) -> int:
    """`mode` less the process umask: what open() or mkdir() would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def temp_dir_beside(final: Path) -> Path:
    """An empty directory next to `final`, to be renamed onto it once complete. It gets the
    mode mkdir() would give: mkdtemp's 0700 would make the finished entry private."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(umasked(0o777))
    return tmp


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only on success,
    so an interrupted or failed build never leaves a half-written cache entry."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        if final.exists():  # a concurrent builder won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file via a temporary sibling and os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); results and caches are meant to be shared
        # like any other file the user writes.
        os.fchmod(fd, umasked(0o666))
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing): parallel sweep jobs that need
    the same uncached artefact build it once, the others wait and then find it cached."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
