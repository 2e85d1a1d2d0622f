"""The one record type every data source produces, the input error, and a strict JSONL reader."""

from __future__ import annotations

import json
import os
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


def iter_jsonl(
    path: str | Path, bad: list[int] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for every non-blank line; a line that is not a JSON
    object raises DataError naming the file and line, so a bad row never passes silently.

    With `bad` (training rows, where one bad row should not stop a run) such lines are skipped
    and their numbers appended to `bad` instead; the caller warns with the count."""
    path = Path(path)
    with open(path, "rb") as f:  # decoded per line, so a bad byte names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if bad is not None:
                    bad.append(lineno)
                    continue
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line: "
                                f"{raw[e.start:e.start + 1]!r})") from None  # fmt: skip
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if bad is not None:
                    bad.append(lineno)
                    continue
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                if bad is not None:
                    bad.append(lineno)
                    continue
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj


DATA_DIR_HINT = "set TAPS_DATA_DIR or paths.data_dir to the offline data folder"


def check_data_dir(data_dir: str | Path | None) -> None:
    """A data dir that is set but missing is a typo, not "use the hub": say which setting
    (the env var or the config key) holds the bad path."""
    if data_dir and not Path(data_dir).is_dir():
        env = os.environ.get("TAPS_DATA_DIR")
        key = "$TAPS_DATA_DIR" if env and Path(env) == Path(data_dir) else "paths.data_dir"
        raise DataError(f"{key}={data_dir}: data dir does not exist ({DATA_DIR_HINT})")
