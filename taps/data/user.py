"""The user's own training data: a JSONL file (`{source: jsonl, path: FILE}`) or a hub dataset
(`{source: hf, name: ID, split: S, subset: ..., format: sharegpt|messages}`), in either record
format a user is likely to have:

- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}`
- OpenAI messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`
  (content may also be a list of `{"type": "text", "text": ...}` parts); system turns are kept.

A bad row (malformed JSON, not UTF-8, an unknown role, no assistant turn, ...) is skipped and
counted per reason with the first line it was seen on; a file without a usable row is an
error naming it."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from taps.data.conversations import Conversation, DataError
from taps.paths import file_digest

log = logging.getLogger("taps.data.sources")

# Keys each user source takes (besides source and examples), and which of them are required.
USER_SOURCES = {
    "jsonl": ({"path"}, {"path"}),
    "hf": ({"name", "split", "subset", "format"}, {"name"}),
}
FORMATS = ("sharegpt", "messages")
_ROLES = {
    "sharegpt": {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"},
    "messages": {"user": "user", "assistant": "assistant", "system": "system"},
}  # fmt: skip
_FIELDS = {"sharegpt": ("conversations", "from", "value"), "messages": ("messages", "role",
                                                                        "content")}  # fmt: skip


def component_label(comp: Mapping) -> str:
    """The name a component's conversations, shares and drafter go by: the source for the
    built-in ones, `jsonl-<file stem>` or `hf-<dataset id>` for the user's."""
    if comp["source"] == "jsonl":
        return f"jsonl-{Path(str(comp['path'])).stem}"
    if comp["source"] == "hf":
        sub = f"-{comp['subset']}" if comp.get("subset") else ""
        return "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "-", f"{comp['name']}{sub}")
    return str(comp["source"])


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if parts and all(isinstance(t, str) for t in parts):
            return "".join(parts)
    return None


def to_conversation(
    obj: Any, rid: str, label: str, fmt: str | None = None
) -> tuple[Conversation | None, str | None]:
    """(conversation, None) or (None, the reason the row is skipped)."""
    if not isinstance(obj, Mapping):
        return None, "not a JSON object"
    fmt = fmt or ("sharegpt" if "conversations" in obj else "messages" if "messages" in obj
                  else None)  # fmt: skip
    if fmt is None:
        return None, "no 'conversations' or 'messages' list"
    key, role_key, text_key = _FIELDS[fmt]
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        return None, f"empty or missing '{key}'"
    messages = []
    for t in turns:
        role = _ROLES[fmt].get(t.get(role_key)) if isinstance(t, Mapping) else None
        if role is None:
            return None, "unknown role"
        text = _text(t.get(text_key))
        if text is None:
            return None, "a turn without text"
        messages.append({"role": role, "content": text})
    while messages and messages[0]["role"] == "assistant":  # nothing before it to answer
        messages.pop(0)
    roles = {m["role"] for m in messages}
    if "assistant" not in roles:
        return None, "no assistant turn"
    if "user" not in roles:
        return None, "no user turn"
    rid = obj.get("id", rid)
    return Conversation(tuple(messages), label, str(rid)), None


class _Skips:
    """Skipped rows per reason, with the first line (or row) each reason was seen on."""

    def __init__(self) -> None:
        self.count: Counter = Counter()
        self.first: dict[str, int] = {}

    def add(self, reason: str, where: int) -> None:
        self.count[reason] += 1
        self.first.setdefault(reason, where)

    def __str__(self) -> str:
        return "; ".join(f"{r}: {n} (first at line {self.first[r]})"
                         for r, n in sorted(self.count.items()))  # fmt: skip


def _lines(path: Path, skips: _Skips) -> Iterable[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.add("not UTF-8", lineno)
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                skips.add("malformed JSON", lineno)


def _finish(convs: list[Conversation], skips: _Skips, where: str) -> list[Conversation]:
    if not convs:
        detail = str(skips) or "no rows"
        raise DataError(f"{where}: no usable conversation ({detail})")
    if skips.count:
        log.warning("%s: kept %d, skipped %d rows: %s", where, len(convs),
                    sum(skips.count.values()), skips)  # fmt: skip
    return convs


def load_jsonl(path: str | Path, label: str, fmt: str | None = None) -> list[Conversation]:
    """Every usable conversation of a JSONL file, in file order (ids: line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data component source=jsonl: {path} is not a file")
    skips, out = _Skips(), []
    for lineno, obj in _lines(path, skips):
        conv, why = to_conversation(obj, f"line{lineno}", label, fmt)
        if conv is None:
            skips.add(why or "unusable", lineno)
        else:
            out.append(conv)
    return _finish(out, skips, str(path))


def load_hf(
    name: str, split: str = "train", subset: str | None = None, fmt: str | None = None,
    label: str | None = None,
) -> tuple[list[Conversation], str]:  # fmt: skip
    """Every usable conversation of a hub dataset split, and its fingerprint (needs network
    or a local datasets cache; offline it fails naming the dataset)."""
    from taps.data.sources import hub_offline, hub_reachable

    where = f"hub dataset {name}" + (f" ({subset})" if subset else "") + f", split {split}"
    if hub_offline() or not hub_reachable():
        raise DataError(f"{where}: the hub is not reachable from here (offline); download it "
                        "and use {source: jsonl, path: FILE} instead")  # fmt: skip
    import datasets  # heavy, only when a hub dataset is really wanted

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # unknown id, gated, no such split ...
        raise DataError(f"{where}: could not be loaded ({type(e).__name__}: {e})") from e
    skips, out = _Skips(), []
    for i, row in enumerate(ds):
        conv, why = to_conversation(row, str(i), label or name, fmt)
        if conv is None:
            skips.add(why or "unusable", i + 1)
        else:
            out.append(conv)
    return _finish(out, skips, where), f"hub:{name}:{getattr(ds, '_fingerprint', 'unknown')}"


def file_fingerprint(path: str | Path) -> str:
    return "sha256:" + file_digest(path)[:16]
