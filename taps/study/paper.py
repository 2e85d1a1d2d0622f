"""outputs/paper/report.md from the five studies' results.json files: the paper's two tables
in its layout with bootstrap intervals and the paper's numbers beside ours, the figures, and
each of the six findings checked against the numbers. A pure function of the stored results
(and the wall-time log), so a test can regenerate it and compare."""

from __future__ import annotations

import json
from pathlib import Path

from taps.eval.intervals import mean_with_ci
from taps.paths import atomic_write_text
from taps.study.figures import FIGURES

STUDIES = ("specialization", "combination", "averaging_sweep", "routing_signals", "depth")
BENCHES = ("mt_bench", "gsm8k", "math500", "svamp")
BENCH_TITLES = ("MT-Bench", "GSM8K", "MATH-500", "SVAMP")
KINDS = {"hass": "HASS", "eagle2": "EAGLE-2"}
# Table rows: (title, study, row filter, the paper's row or None).
VARIANTS = (
    ("MathInstruct", "specialization", {"routing": "single", "data": "mathinstruct"}, "math"),
    ("ShareGPT", "specialization", {"routing": "single", "data": "sharegpt"}, "sharegpt"),
    ("Mixed (35k+35k)", "specialization", {"routing": "single", "data": "mix"}, "mix"),
    ("Mixed (70k+70k)", "specialization", {"routing": "single", "data": "mix_large"}, "mix_large"),
    ("Averaged (a=0.5)", "combination", {"routing": "average(0.5)"}, "averaged"),
    ("Confidence routed", "combination", {"routing": "confidence"}, "confidence"),
    ("Entropy routed", "combination", {"routing": "entropy"}, None),
    ("Merged trees (full)", "combination", {"routing": "merged_tree(full)"}, "merged"),
    ("Merged trees (matched)", "combination", {"routing": "merged_tree(matched)"}, None),
)
# The paper's Table (Llama-3-8B-Instruct): MT-Bench, GSM8K, MATH-500, SVAMP, average.
_P = {
    "math": ("2.90/5.02/5.35/3.13/4.10", "2.54/5.04/5.28/4.81/4.42",
             "2.31/4.75/4.63/2.46/3.54", "2.43/4.71/4.61/4.53/4.07"),
    "sharegpt": ("3.98/4.09/3.98/4.44/4.12", "3.57/3.72/3.81/3.71/3.70",
                 "3.50/4.03/3.61/3.95/3.77", "3.38/3.72/3.43/3.65/3.54"),
    "mix": ("3.92/4.77/5.02/4.15/4.47", "3.37/4.12/4.44/4.16/4.02",
            "3.46/4.66/4.47/4.57/4.29", "3.10/4.08/4.02/4.03/3.81"),
    "mix_large": ("4.13/5.53/5.67/5.38/5.18", "3.75/4.68/4.85/4.64/4.48",
                  "3.17/4.16/3.42/4.01/3.69", "2.99/3.76/3.20/3.08/3.26"),
    "averaged": ("2.29/2.80/3.12/2.13/2.59", "2.07/2.53/2.57/2.50/2.42",
                 "2.10/2.78/2.90/2.69/2.62", "2.01/2.49/2.42/2.45/2.34"),
    "confidence": ("3.93/5.01/5.37/4.89/4.80", "3.63/4.91/5.25/4.71/4.63",
                   "3.51/4.72/4.55/4.71/4.37", "3.36/4.65/4.62/4.46/4.27"),
    "merged": ("4.05/5.42/5.65/5.31/5.11", "3.93/5.32/5.63/5.25/5.02",
               "3.76/5.21/4.98/5.05/4.75", "3.55/5.01/4.79/4.93/4.57"),
}  # fmt: skip
_COLS = (("hass", 0.0), ("eagle2", 0.0), ("hass", 1.0), ("eagle2", 1.0))
PAPER = {
    (kind, temp): {v: [float(x) for x in cells[i].split("/")] for v, cells in _P.items()}
    for i, (kind, temp) in enumerate(_COLS)
}


def paper_studies() -> dict[str, list[dict]]:
    """The paper's table as rows of our studies, so the same checks can read it."""
    studies: dict[str, list[dict]] = {}
    for _, study, where, key in VARIANTS:
        for (kind, temp), table in PAPER.items():
            if key in table:
                studies.setdefault(study, []).extend(
                    {"drafter": kind, "temperature": temp, "bench": b, "tau": tau, **where}
                    for b, tau in zip(BENCHES, table[key], strict=False)
                )
    return studies


def load_rows(out: str | Path, study: str) -> list[dict]:
    rows = []
    for f in sorted((Path(out) / "runs" / study).rglob("results.json")):
        rows += json.loads(f.read_text())["rows"]
    return rows


def study_config(out: str | Path) -> dict | None:
    """The resolved config of one job (the scale every study shares), or None."""
    for study in STUDIES:
        for f in sorted((Path(out) / "runs" / study).rglob("results.json")):
            return json.loads(f.read_text()).get("config")
    return None


def pick(rows: list[dict], kind: str, temp: float, **where: str) -> dict[str, dict]:
    """bench -> row for one drafter kind, temperature and variant filter."""
    return {
        r["bench"]: r
        for r in rows
        if r["drafter"] == kind
        and r["temperature"] == temp
        and all(r.get(k) == v for k, v in where.items())
    }


def variant_means(studies: dict[str, list[dict]], kind: str, temp: float) -> dict[str, float]:
    """Mean tau over the four benchmarks for every table variant present in full."""
    out = {}
    for title, study, where, _ in VARIANTS:
        got = pick(studies.get(study, []), kind, temp, **where)
        if all(b in got for b in BENCHES):
            out[title] = sum(got[b]["tau"] for b in BENCHES) / len(BENCHES)
    return out


def _cell(tau: float, ci: tuple[float, float] | list | None) -> str:
    return f"{tau:.2f}" if not ci else f"{tau:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def tables(studies: dict[str, list[dict]]) -> list[str]:
    """The paper's table, one block per (drafter kind, temperature)."""
    lines = []
    for kind, temp in _COLS:
        head = " | ".join(BENCH_TITLES)
        lines += [
            f"### {KINDS[kind]}, T={temp:g}",
            "",
            f"| variant | {head} | average | verified tok/cycle | tok/s | paper "
            "(MT/GSM8K/MATH/SVAMP/avg) |",
            "|---" * 9 + "|",
        ]
        for title, study, where, paper_key in VARIANTS:
            got = pick(studies.get(study, []), kind, temp, **where)
            if not got:
                continue
            cells = [_cell(got[b]["tau"], got[b].get("tau_ci95")) if b in got else "-"
                     for b in BENCHES]  # fmt: skip
            mine = [got[b] for b in BENCHES if b in got]
            avg = _cell(*mean_with_ci(mine)) if len(mine) == len(BENCHES) else "-"
            verified = sum(r["tree_tokens_per_cycle"] or 0 for r in mine) / len(mine)
            tps = sum(r["new_tokens"] for r in mine) / max(
                sum(r["wall_time_s"] for r in mine), 1e-9
            )
            paper = PAPER[(kind, temp)].get(paper_key) if paper_key else None
            ref = "/".join(f"{x:.2f}" for x in paper) if paper else "not in the paper"
            lines.append(f"| {title} | " + " | ".join(cells)
                         + f" | {avg} | {verified:.1f} | {tps:.1f} | {ref} |")  # fmt: skip
        lines.append("")
    return lines


def write_report(out: str | Path, history: list[dict]) -> Path:
    """Write report.md and its PNGs under `out` from out/runs/<study>/**/results.json."""
    from taps.study.findings import findings  # the checks read the same tables

    out = Path(out)
    studies = {s: load_rows(out, s) for s in STUDIES}
    figures = {name: fn(studies, out / f"{name}.png") for name, fn in FIGURES.items()}
    lines = ["# TAPS: the paper's study, reproduced at this scale", ""]
    lines += _scale(study_config(out)) + _timing(history)
    lines += ["## Findings", "",
              "Each check runs per drafter kind and temperature; `here` counts where it holds. "
              "The checks compare point estimates: where the bootstrap intervals in the tables "
              "below overlap, a verdict either way is not resolved at this sample size. The "
              "last column applies the same check to the paper's own table.", "",
              "| # | the paper's claim | here | evidence (ours) | the paper's numbers |",
              "|---|---|---|---|---|"]  # fmt: skip
    theirs = findings(paper_studies())
    lines += [f"| {i} | {claim} | **{verdict}** | {evidence} | {ref[1]} |"
              for i, ((claim, verdict, evidence), ref)
              in enumerate(zip(findings(studies), theirs, strict=True), 1)]  # fmt: skip
    lines += ["", "## Acceptance length tau (the paper's layout)", "",
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
