"""outputs/paper/report.md from the five studies' results.json files (work in progress)."""

from __future__ import annotations

import json
from pathlib import Path

from taps.paths import atomic_write_text

STUDIES = ("specialization", "combination", "averaging_sweep", "routing_signals", "depth")


def load_rows(out: str | Path, study: str) -> list[dict]:
    rows = []
    for f in sorted((Path(out) / "runs" / study).rglob("results.json")):
        rows += json.loads(f.read_text())["rows"]
    return rows


def write_report(out: str | Path, history: list[dict]) -> Path:
    out = Path(out)
    lines = ["# TAPS paper study", ""]
    for study in STUDIES:
        rows = load_rows(out, study)
        lines += [f"## {study}: {len(rows)} rows", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
