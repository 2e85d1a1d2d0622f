"""Reading result rows back: the one loader for results.json files, so every reader sees rows of
one schema, and the one way a tau with its interval is written in a table.

Schema 2 rows carry `strategy` (the registered strategy name) and `options` (its options) next
to the display labels `variant` and `routing`. Schema 1 files lack those two fields; their
`config.routing` holds the same facts, so their rows are upgraded here, once, and no reader
ever parses a label back into data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

# config.routing keys that are not options of the strategy.
_NOT_OPTIONS = ("name", "label", "drafters")


def results_files(*dirs: str | Path) -> Iterator[tuple[Path, dict]]:
    """(path, parsed document) of every results.json below each directory, sorted per directory,
    directories in the order given."""
    for d in dirs:
        for f in sorted(Path(d).rglob("results.json")):
            yield f, json.loads(f.read_text())


def rows_of(doc: dict, path: str | Path) -> list[dict]:
    """The rows of one results.json document, each with `strategy` and `options`; ValueError
    naming `path` for a schema this code does not read."""
    version = doc.get("schema_version")
    if version == 1:
        routing = (doc.get("config") or {}).get("routing")
        if not isinstance(routing, dict) or "name" not in routing:
            raise ValueError(f"{path}: schema_version 1 without config.routing.name")
        options = {k: v for k, v in routing.items() if k not in _NOT_OPTIONS}
        rows = [{**r, "strategy": routing["name"], "options": dict(options)} for r in doc["rows"]]
    elif version == 2:
        rows = doc["rows"]
    else:
        raise ValueError(f"{path}: unknown results.json schema_version {version!r} (reads 1, 2)")
    for r in rows:
        if not isinstance(r.get("strategy"), str) or not isinstance(r.get("options"), dict):
            raise ValueError(f"{path}: a row without `strategy` and `options`: {r.get('variant')}")
    return rows


def load_rows(*dirs: str | Path) -> list[dict]:
    """Every row of every results.json below the directories (see results_files)."""
    return [r for path, doc in results_files(*dirs) for r in rows_of(doc, path)]


def tau_cell(tau: float, ci: tuple[float, float] | list | None) -> str:
    """A table cell: tau, and its 95% interval when there is one."""
    return f"{tau:.2f}" if not ci else f"{tau:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
