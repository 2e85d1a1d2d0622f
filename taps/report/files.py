"""Results files of a run: results.json (the source of truth), results.csv, results.md and a
tau heatmap. All are written atomically and derived from the same rows, so they agree."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from taps.paths import atomic_write_text  # noqa: E402
from taps.report.figures import save_figure  # noqa: E402
from taps.report.routing import routing_plot, weights_plot  # noqa: E402

# 2: rows carry `strategy` and its `options` (1: only the display label `routing`).
SCHEMA_VERSION = 2
# Scalar columns of the CSV and Markdown grids, in order.
COLUMNS = [
    "variant",
    "routing",
    "strategy",
    "drafter",
    "data",
    "tree",
    "bench",
    "temperature",
    "tau",
    "tau_ci_low",
    "tau_ci_high",
    "prompts",
    "turns",
    "new_tokens",
    "cycles",
    "target_forwards",
    "wall_time_s",
    "tokens_per_s",
    "vanilla_tokens_per_s",
    "speedup_vs_vanilla",
    "tree_tokens_per_cycle",
    "draft_forwards_per_cycle",
    "identical_fraction",
]


def flat(row: dict) -> dict:
    out = {c: row.get(c) for c in COLUMNS}
    out["identical_fraction"] = (row.get("lossless") or {}).get("identical_fraction")
    ci = row.get("tau_ci95") or [None, None]
    out["tau_ci_low"], out["tau_ci_high"] = ci
    return out


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(flat(r))
    return buf.getvalue()


def to_markdown(rows: list[dict]) -> str:
    """A variant x benchmark tau grid per temperature, then the full table."""
    lines = []
    for temp in sorted({r["temperature"] for r in rows}):
        sub = [r for r in rows if r["temperature"] == temp]
        benches = list(dict.fromkeys(r["bench"] for r in sub))
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        lines += [
            f"### tau at T={temp:g}",
            "",
            "| variant | " + " | ".join(benches) + " | mean |",
            "|---" * (len(benches) + 2) + "|",
        ]
        for v in variants:
            cells = [
                next((r["tau"] for r in sub if r["variant"] == v and r["bench"] == b), None)
                for b in benches
            ]
            got = [c for c in cells if c is not None]
            mean = sum(got) / len(got) if got else None
            lines.append(f"| {v} | " + " | ".join(_fmt(c) for c in cells) + f" | {_fmt(mean)} |")
        lines.append("")
    lines += speed_lines(rows)
    lines += ["### all columns", "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in flat(r).values()) + " |")
    return "\n".join(lines) + "\n"


def speed_lines(rows: list[dict]) -> list[str]:
    """What speculative decoding bought in wall time, where vanilla decoding ran beside it
    (eval.verify_lossless at T=0): tokens/s of both, the speedup, and output identity."""
    timed = [r for r in rows if r.get("speedup_vs_vanilla") is not None]
    if not timed:
        return []
    lines = ["### speed against vanilla decoding (same process, same precision, turn by turn)",
             "", "| variant | bench | tau | speculative tok/s | vanilla tok/s | speedup | "
             "identical to vanilla |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in timed:
        lines.append(f"| {r['variant']} | {r['bench']} | {r['tau']:.2f} | {r['tokens_per_s']:.1f} "
                     f"| {r['vanilla_tokens_per_s']:.1f} | {r['speedup_vs_vanilla']:.2f}x | "
                     f"{identity(r.get('lossless') or {})} |")  # fmt: skip
    spec = sum(r["new_tokens"] for r in timed) / sum(r["wall_time_s"] for r in timed)
    van = sum(r["new_tokens"] for r in timed) / sum(
        r["new_tokens"] / r["vanilla_tokens_per_s"] for r in timed
    )
    lines += ["", f"**Overall: {spec:.1f} tok/s speculative vs {van:.1f} tok/s vanilla: "
              f"{spec / van:.2f}x.**", ""]  # fmt: skip
    return lines


def identity(check: dict) -> str:
    """'3/4 turns (1 near-tie)': identical turns, and what the others' divergences were."""
    turns = check.get("checked_turns", 0)
    same = round(check.get("identical_fraction", 0) * turns)
    bad = check.get("divergences", [])
    ties = sum(bool(d.get("near_tie")) for d in bad)
    clear = len(bad) - ties
    notes = [f"{ties} near-tie{'s' * (ties != 1)}"] if ties else []
    notes += [f"{clear} NOT " + ("a near-tie" if clear == 1 else "near-ties")] if clear else []
    return f"{same}/{turns} turns" + (f" ({', '.join(notes)})" if notes else "")


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def heatmap(rows: list[dict], path: str | Path) -> None:
    """tau per variant (rows) x benchmark (columns), one panel per temperature."""
    temps = sorted({r["temperature"] for r in rows})
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(
        1,
        len(temps),
        squeeze=False,
        figsize=(1.6 + 1.3 * len(benches) * len(temps), 1.2 + 0.5 * len(variants)),
    )
    vmax = max(r["tau"] for r in rows)
    for ax, temp in zip(axes[0], temps, strict=True):
        grid = [
            [
                next(
                    (
                        r["tau"]
                        for r in rows
                        if r["variant"] == v and r["bench"] == b and r["temperature"] == temp
                    ),
                    float("nan"),
                )
                for b in benches
            ]
            for v in variants
        ]
        im = ax.imshow(grid, cmap="viridis", vmin=1.0, vmax=max(vmax, 1.01), aspect="auto")
        for i, line in enumerate(grid):
            for j, val in enumerate(line):
                if val == val:  # not NaN; dark text on the bright end of viridis
                    dark = (val - 1.0) / max(vmax - 1.0, 0.01) > 0.6
                    ax.text(
                        j,
                        i,
                        f"{val:.2f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="k" if dark else "w",
                    )
        ax.set_xticks(range(len(benches)), benches, rotation=30, ha="right")
        ax.set_yticks(range(len(variants)), variants)
        ax.set_title(f"acceptance length tau, T={temp:g}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    save_figure(fig, path)


def depth_plot(rows: list[dict], path: str | Path) -> None:
    """Fraction of cycles accepting at least d draft tokens, one curve per row."""
    temps = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(1, len(temps), squeeze=False, figsize=(5 * len(temps), 3.6))
    for ax, temp in zip(axes[0], temps, strict=True):
        for r in rows:
            if r["temperature"] == temp and r.get("acceptance_by_depth"):
                d = r["acceptance_by_depth"]
                ax.plot(range(1, len(d) + 1), d, marker="o", label=f"{r['variant']} {r['bench']}")
        ax.set_xticks(
            range(1, 1 + max((len(r.get("acceptance_by_depth") or []) for r in rows), default=1))
        )
        ax.set_xlabel("draft depth d")
        ax.set_ylabel("cycles accepting >= d tokens")
        ax.set_ylim(0, 1)
        ax.set_title(f"acceptance by depth, T={temp:g}")
        ax.legend(fontsize=7)
    save_figure(fig, path)


NODE_COLUMNS = [
    "variant",
    "bench",
    "temperature",
    "accepted_confidence",
    "rejected_confidence",
    "accepted_entropy",
    "rejected_entropy",
]


def result_paths(run_dir: str | Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    paths = {
        "json": run_dir / "results.json",
        "csv": run_dir / "results.csv",
        "md": run_dir / "results.md",
        "heatmap": run_dir / "tau_heatmap.png",
        "depth": run_dir / "acceptance_by_depth.png",
        "routing": run_dir / "routing_shares.png",
        "weights": run_dir / "routing_weights.png",
        "outputs": run_dir / "outputs.jsonl",
    }
    for optional in ("routing", "weights"):
        if not paths[optional].is_file():
            del paths[optional]
    return paths


TAU_DEFINITION = (
    "new tokens / target forwards, prefill included, over all turns of a benchmark (token-weighted)"
)


def run_meta(
    target: str, names: list[str], drafters: list[dict], max_new_tokens: int, config: dict
) -> dict:
    """results.json's header: the target, each drafter's metadata by name, the resolved config."""
    return {
        "target": target,
        "drafter": drafters[0] if len(drafters) == 1 else None,
        "drafters": dict(zip(names, drafters, strict=True)),
        "max_new_tokens": max_new_tokens,
        "tau_definition": TAU_DEFINITION,
        "config": config,
    }


def write_results(
    run_dir: str | Path, rows: list[dict], meta: dict, outputs: list[dict] | None = None
) -> dict[str, Path]:
    """Every file of a run, from its rows (and the generated texts, one JSON line per prompt
    and turn, in outputs.jsonl)."""
    run_dir = Path(run_dir)
    paths = {**result_paths(run_dir), "routing": run_dir / "routing_shares.png",
             "weights": run_dir / "routing_weights.png"}  # fmt: skip
    doc = {"schema_version": SCHEMA_VERSION, **meta, "rows": rows}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str))
    atomic_write_text(paths["outputs"], "".join(json.dumps(o) + "\n" for o in outputs or []))
    atomic_write_text(paths["csv"], to_csv(rows))
    atomic_write_text(paths["md"], to_markdown(rows))
    heatmap(rows, paths["heatmap"])
    depth_plot(rows, paths["depth"])
    if not routing_plot(rows, paths["routing"]):
        del paths["routing"]
    if not weights_plot(rows, paths["weights"]):
        del paths["weights"]
    return paths


def unchanged(run_dir: str | Path, rows: list[dict]) -> bool:
    """The run dir already holds exactly these rows and every file derived from them (a re-run
    with every cell cached: nothing to write or log)."""
    try:
        old = json.loads((Path(run_dir) / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return False
    same = json.dumps(old, sort_keys=True, default=str) == json.dumps(
        rows, sort_keys=True, default=str
    )
    optional = ("routing", "weights")
    return same and all(p.is_file() for k, p in result_paths(run_dir).items() if k not in optional)


def describe(paths: dict[str, Path], wandb_dir: str | None = None) -> str:
    """Where a run's files are, its Markdown table, and its offline W&B run if there is one:
    what `python -m taps.run` prints."""
    lines = [f"routing shares: {paths['routing']}"] if "routing" in paths else []
    lines += [f"routing weights: {paths['weights']}"] if "weights" in paths else []
    lines += ["", f"results: {paths['json']}", f"  table: {paths['md']}",
              f"  csv:   {paths['csv']}", f"  texts: {paths['outputs']}",
              f"  plots: {paths['heatmap']}", f"         {paths['depth']}"]  # fmt: skip
    text = "\n".join(lines) + "\n" + Path(paths["md"]).read_text()
    if wandb_dir:
        text += f"  W&B offline run: {Path(wandb_dir).parent}  (upload: wandb sync <dir>)\n"
    return text
