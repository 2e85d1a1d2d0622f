"""Where things live: the offline data dir, the artefact cache, atomic writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("taps")


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


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed; remembered for the process while the file's size and
    mtime stay the same (a multirun verifies a 540 MB target once, not once per job)."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


MANIFEST = "MANIFEST.json"  # every cache entry's files with their sha256, written at creation


class IntegrityError(RuntimeError):
    """A cache entry's bytes differ from those it was created with (or cannot be vouched for)."""


def write_manifest(directory: Path) -> dict[str, str]:
    """Record the sha256 and size of every file below `directory` in its MANIFEST.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p.relative_to(directory).as_posix(): file_digest(p) for p in files}
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size for p in files}
    doc = {"sha256": digests, "size": sizes}
    (directory / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return digests


def verify_entry(directory: str | Path, what: str) -> dict[str, str]:
    """Check every file of the cache entry `directory` against the manifest written when it was
    built and return the digests. A missing manifest, file, or a changed byte is an
    IntegrityError naming the file, what it is and how to rebuild it: never a silent rebuild."""
    directory = Path(directory)
    rebuild = f"delete {directory} and run again to rebuild it"
    try:
        doc = json.loads((directory / MANIFEST).read_text())
        digests, sizes = doc["sha256"], doc["size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(
            f"{directory}: {what} has no readable {MANIFEST} ({type(e).__name__}), so its "
            f"content cannot be vouched for (built by an older taps, or damaged): {rebuild}"
        ) from None
    for rel, want in sorted(digests.items()):
        f = directory / rel
        if not f.is_file():
            raise IntegrityError(f"{f}: file of {what} is missing: {rebuild}")
        if f.stat().st_size != sizes.get(rel) or file_digest(f) != want:
            raise IntegrityError(
                f"{f}: {what} changed since it was built (sha256 {file_digest(f)[:16]}..., "
                f"recorded {want[:16]}...): {rebuild}"
            )
    return digests


def umasked(mode: int) -> int:
    """`mode` less the process umask: what open() or mkdir() would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def temp_dir_beside(final: Path) -> Path:
    """An empty directory next to `final`, to be renamed onto it once complete. It gets the
    mode mkdir() would give: mkdtemp's 0700 would make the finished entry private."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    tmp.chmod(umasked(0o777))
    return tmp


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary build directories of `final` whose builder process is gone (a
    SIGKILL during a build leaves one behind); those of live processes are left alone."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{final.name}.tmp-").split("-", 1)[0]
        if tmp.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only on success,
    so an interrupted or failed build never leaves a half-written cache entry."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_dir_beside(final)
    try:
        yield tmp
        # safetensors and torch write 0600; a cache entry is shared like any file the user writes
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(umasked(0o666))
        write_manifest(tmp)
        if final.exists():  # a concurrent builder won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except OSError as e:  # e.g. a full disk: say which entry could not be built
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(e, final, "could not build the cache entry") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _naming(e: OSError, path: Path, what: str) -> OSError:
    """The same kind of OSError, its message naming the file ("No space left on device" alone
    does not say where)."""
    if e.errno is None or str(path) in str(e):
        return e
    return type(e)(e.errno, f"{path}: {what} ({e.strerror})")


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
    except OSError as e:  # e.g. a full disk: say which file could not be written
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path, "could not write") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_verified_text(path: str | Path, text: str) -> None:
    """A cache file and, beside it, `<name>.sha256` with its digest (written after it: a file
    without its digest is never vouched for)."""
    path = Path(path)
    atomic_write_text(path, text)
    atomic_write_text(path.with_name(path.name + ".sha256"), file_digest(path) + "\n")


def read_verified_text(path: str | Path, what: str) -> str:
    """The text of a file written by write_verified_text, or an IntegrityError naming it."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    try:
        want = side.read_text().strip()
    except OSError:
        raise IntegrityError(f"{path}: {what} has no digest file {side.name}, so it cannot be "
                             f"vouched for: delete {path} to rebuild it") from None  # fmt: skip
    if file_digest(path) != want:
        raise IntegrityError(f"{path}: {what} changed since it was written (its sha256 does not "
                             f"match {side.name}): delete both to rebuild it")  # fmt: skip
    return path.read_text(encoding="utf-8")


@contextmanager
def file_lock(path: str | Path, what: str | None = None) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing): parallel sweep jobs that need
    the same uncached artefact build it once, the others wait and then find it cached. A
    process that has to wait says so, and for what."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another process holds %s", what or path.name, path)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("got %s after %.0f s", path, time.perf_counter() - t0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
