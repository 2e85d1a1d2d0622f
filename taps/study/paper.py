"""outputs/paper/report.md from the five studies' results.json files: the paper's two tables
in its layout with bootstrap intervals and the paper's numbers beside ours, the figures, and
each of the six findings graded by taps.study.findings. A pure function of the stored results
(and the wall-time log), so a test can regenerate it and compare."""

from __future__ import annotations

from pathlib import Path

from taps.eval.intervals import mean_with_ci
from taps.paths import atomic_write_text
from taps.report.rows import load_rows, results_files, tau_cell
from taps.study.figures import FIGURES
from taps.study.findings import (
    CLAIMS,
    GRADING,
    across_temperatures,
    evidence_line,
    grade_all,
    verdict_table,
)
from taps.study.variants import (
    BENCH_TITLES,
    BENCHES,
    COLS,
    KINDS,
    PAPER,
    VARIANTS,
    paper_studies,
    select,
)

STUDIES = ("specialization", "combination", "averaging_sweep", "routing_signals", "depth")
# The studies whose rows the findings read (routing_signals: the same cells as combination's
# routed variants, with the per-node statistics).
FINDING_STUDIES = ("specialization", "combination", "routing_signals")


def study_rows(out: str | Path, study: str) -> list[dict]:
    """The rows of one study: every results.json under out/runs/<study>."""
    return load_rows(Path(out) / "runs" / study)


def study_config(out: str | Path) -> dict | None:
    """The resolved config of one job (the scale every study shares), or None."""
    for study in STUDIES:
        for _, doc in results_files(Path(out) / "runs" / study):
            return doc.get("config")
    return None


def tables(studies: dict[str, list[dict]]) -> list[str]:
    """The paper's table, one block per (drafter kind, temperature)."""
    lines = []
    for kind, temp in COLS:
        head = " | ".join(BENCH_TITLES)
        lines += [
            f"### {KINDS[kind]}, T={temp:g}",
            "",
            f"| variant | {head} | average | verified tok/cycle | tok/s | paper "
            "(MT/GSM8K/MATH/SVAMP/avg) |",
            "|---" * 9 + "|",
        ]
        for v in VARIANTS:
            got = select(studies.get(v.study, []), v, kind, temp)
            if not got:
                continue
            cells = [tau_cell(got[b]["tau"], got[b].get("tau_ci95")) if b in got else "-"
                     for b in BENCHES]  # fmt: skip
            mine = [got[b] for b in BENCHES if b in got]
            avg = tau_cell(*mean_with_ci(mine)) if len(mine) == len(BENCHES) else "-"
            verified = sum(r["tree_tokens_per_cycle"] or 0 for r in mine) / len(mine)
            tps = sum(r["new_tokens"] for r in mine) / max(
                sum(r["wall_time_s"] for r in mine), 1e-9
            )
            paper = PAPER[(kind, temp)].get(v.paper) if v.paper else None
            ref = "/".join(f"{x:.2f}" for x in paper) if paper else "not in the paper"
            lines.append(f"| {v.title} | " + " | ".join(cells)
                         + f" | {avg} | {verified:.1f} | {tps:.1f} | {ref} |")  # fmt: skip
        lines.append("")
    return lines


def finding_rows(studies: dict[str, list[dict]]) -> list[dict]:
    """The rows the findings read, from the studies that hold the paper's variants."""
    return [r for s in FINDING_STUDIES for r in studies.get(s, [])]


def findings_section(studies: dict[str, list[dict]]) -> list[str]:
    """The verdict table (ours, and the paper's own table by direction), then the evidence."""
    ours = grade_all(finding_rows(studies))
    theirs = grade_all(finding_rows(paper_studies()), intervals=False)
    lines = ["## Findings", "", GRADING + " The last column grades the paper's own table by the "
             "direction of the same differences only: it has no per-question data, so no "
             "intervals. What each claim requires is in taps/study/findings.py.", ""]  # fmt: skip
    lines += verdict_table(ours, theirs) + [""] + across_temperatures(ours, theirs) + [""]
    lines += ["### The numbers behind each verdict", "",
              "Differences of mean tau over the benchmarks both variants have (or on the one "
              "benchmark named), first minus second, with the paired 95% bootstrap interval.",
              ""]  # fmt: skip
    for finding, claim in CLAIMS.items():
        mine = [v for v in ours if v.finding == finding]
        if mine:
            lines += [f"**{finding}. {claim}.**", ""]
            lines += [f"- {v.cell}, {evidence_line(v)}" for v in mine] + [""]
    return lines


def write_report(out: str | Path, history: list[dict]) -> Path:
    """Write report.md and its PNGs under `out` from out/runs/<study>/**/results.json."""
    out = Path(out)
    studies = {s: study_rows(out, s) for s in STUDIES}
    figures = {name: fn(studies, out / f"{name}.png") for name, fn in FIGURES.items()}
    lines = ["# TAPS: the paper's study, reproduced at this scale", ""]
    lines += _scale(study_config(out)) + _timing(history) + findings_section(studies)
    lines += ["## Acceptance length tau (the paper's layout)", "",
              "Mean tau per benchmark with its 95% bootstrap interval over prompts; `average` "
              "resamples every benchmark's prompts at once. The paper's Llama-3-8B numbers are "
              "in the last column.", ""]  # fmt: skip
    lines += tables(studies)
    for name, (title, caption) in figures.items():
        if title:
            lines += [f"## {title}", "", f"![{title}]({name}.png)", "", caption, ""]
    counts = ", ".join(f"{s}: {len(r)} rows" for s, r in studies.items())
    lines += ["## Sources", "", f"results.json rows read: {counts}.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _scale(cfg: dict | None) -> list[str]:
    if cfg is None:
        return ["No results yet: run `make paper`.", ""]
    d, t = cfg["data"], cfg["tree"]
    return [
        f"- Target: `{cfg['target'].get('name', cfg['target'].get('_target_'))}`; drafters "
        f"trained on data budget `{d.get('budget')}` (max length {d.get('max_len')}), "
        f"{cfg['trainer'].get('max_epochs')} epochs.",
        f"- Tree: `{t['name']}` (top-k {t['top_k']}, depth {t['depth']}, {t['total_tokens']} "
        f"tokens); {cfg['bench'].get('limit') or 'all'} prompts per benchmark (MT-Bench: both "
        f"turns), {cfg['max_new_tokens']} new tokens per turn, T in {{0, 1}}.",
        "- The paper: Llama-3-8B-Instruct, 70k examples, 20 epochs, a 60-token tree, full "
        "benchmarks (`scale=paper_gpu`). Numbers at this scale are small-sample: read the "
        "intervals.",
        "",
    ]


def _timing(history: list[dict]) -> list[str]:
    if not history:
        return []
    lines = ["## Wall time of `make paper`", "",
             "| run started | seconds | drafters trained | cells decoded | per study (s) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for h in history:
        s = h["studies"]
        per = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in s.items())
        lines.append(f"| {h['started']} | {h['seconds']:.0f} | "
                     f"{sum(v['drafters_trained'] for v in s.values())} | "
                     f"{sum(v['cells_decoded'] for v in s.values())} | {per} |")  # fmt: skip
    return [*lines, ""]
