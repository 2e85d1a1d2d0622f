"""The one record type every data source produces, the input error, and a strict JSONL reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A clear input error: the message names the file and line, or the config key."""


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, str], ...]  # each {"role": "system"|"user"|"assistant", "content"}
    source: str  # e.g. "sharegpt", "gsm8k_train", "mathinstruct"
    id: str  # stable id within the source

    @property
    def n_assistant(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for every non-blank line; a line that is not a JSON
    object raises DataError naming the file and line, so a bad row never passes silently."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj
