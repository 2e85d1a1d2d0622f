"""The combination grid from run directories: tau with 95% bootstrap intervals per variant x
benchmark x temperature, verification and drafting cost per cycle, routing shares, and the
paper's findings graded on the numbers by taps.study.findings (as in the paper's report).

    python experiments/combination_table.py outputs/multiruns/<stamp> [more dirs ...] \
        [--out F.md] [--figures DIR]

Reads every results.json below the directories (single runs or multirun jobs). --figures writes
combination_tau.png (tau per variant and benchmark with its interval, one panel per
temperature) and combination_routing.png (routing shares of the routed variants).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from taps.eval.intervals import mean_with_ci
from taps.paths import atomic_write_text
from taps.report.figures import plt, save_figure  # Agg backend: runs headless
from taps.report.routing import routing_plot
from taps.report.rows import load_rows, tau_cell
from taps.study.findings import GRADING, evidence_line, grade_all, variant_means, verdict_table
from taps.study.variants import KINDS, cells


def label(row: dict) -> str:
    """A row's short name: its routing label, or single:<data> for a single drafter."""
    return f"single:{row['data']}" if row["strategy"] == "single" else row["routing"]


def grid(rows: list[dict]) -> str:
    """Markdown tables of tau per variant and benchmark, one per temperature."""
    lines = []
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    for temp in sorted({r["temperature"] for r in rows}):
        sub = [r for r in rows if r["temperature"] == temp]
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        lines += [
            f"### tau at T={temp:g} (95% bootstrap interval over prompts)",
            "",
            "| variant | " + " | ".join(benches) + " | mean | verified tok/cycle "
            "| draft fwd/cycle | tok/s |",
            "|---" * (len(benches) + 5) + "|",
        ]
        for v in variants:
            mine = [r for r in sub if r["variant"] == v]
            cells = []
            for b in benches:
                r = next((x for x in mine if x["bench"] == b), None)
                cells.append("-" if r is None else tau_cell(r["tau"], r.get("tau_ci95")))
            cost = [x["tree_tokens_per_cycle"] or 0 for x in mine]
            fwd = [x["draft_forwards_per_cycle"] or 0 for x in mine]
            tps = sum(x["new_tokens"] for x in mine) / max(
                sum(x["wall_time_s"] for x in mine), 1e-9
            )
            lines.append(
                f"| {v} | " + " | ".join(cells) + f" | {tau_cell(*mean_with_ci(mine))} "
                f"| {sum(cost) / len(cost):.1f} | {sum(fwd) / len(fwd):.1f} | {tps:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def shares_table(rows: list[dict]) -> str:
    routed = [r for r in rows if r.get("routing_shares")]
    if not routed:
        return ""
    drafters = list(dict.fromkeys(d for r in routed for d in r["routing_shares"]["cycles"]))
    head = " | ".join(f"{d} cycles | {d} questions" for d in drafters)
    lines = ["### routing shares", "", f"| variant | bench | T | {head} |",
             "|---" * (3 + 2 * len(drafters)) + "|"]  # fmt: skip
    for r in routed:
        sh = r["routing_shares"]
        cells = " | ".join(
            f"{sh['cycles'].get(d, 0):.2f} | {sh['questions'].get(d, 0):.2f}" for d in drafters
        )
        lines.append(f"| {r['variant']} | {r['bench']} | {r['temperature']:g} | {cells} |")
    return "\n".join(lines) + "\n"


def findings(rows: list[dict]) -> str:
    """The paper's findings graded on these rows by taps.study.findings (the same module the
    paper's report uses): a verdict table, then per drafter kind and temperature the ranking
    of the variants and the differences each verdict rests on."""
    verdicts = grade_all(rows)
    out = ["### the paper's findings at this scale", "", GRADING, ""]
    if not verdicts:
        return "\n".join([*out, "Nothing here to grade: no finding's variants are present.", ""])
    out += [*verdict_table(verdicts), ""]
    for kind, temp in cells(rows):
        ranked = ", ".join(f"{lb} {m:.2f}" for lb, m in variant_means(rows, kind, temp))
        out.append(f"- {KINDS.get(kind, kind)}, T={temp:g}, mean tau: {ranked}")
        out += [f"  - {v.finding} {evidence_line(v)}" for v in verdicts
                if (v.kind, v.temperature) == (kind, temp)]  # fmt: skip
    across = [v for v in verdicts if v.temperature is None]
    out += [f"- {v.cell}, {v.finding} (across temperatures) {evidence_line(v)}" for v in across]
    return "\n".join(out) + "\n"


def report(rows: list[dict]) -> str:
    """The Markdown the script prints: tau grid, routing shares, findings."""
    return "\n".join([grid(rows), shares_table(rows), findings(rows)])


def tau_bars(rows: list[dict], path: Path) -> None:
    """Grouped bars: tau per benchmark (and the mean), one bar per variant, 95% intervals."""
    temps = sorted({r["temperature"] for r in rows})
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    names: dict[str, str] = {}
    for r in rows:
        names.setdefault(r["variant"], label(r))
    variants = list(names)
    fig, axes = plt.subplots(len(temps), 1, figsize=(11, 3.6 * len(temps)), squeeze=False)
    width = 0.8 / len(variants)
    colors = plt.get_cmap("tab10").colors
    for ax, temp in zip(axes[:, 0], temps, strict=True):
        for k, v in enumerate(variants):
            mine = [r for r in rows if r["variant"] == v and r["temperature"] == temp]
            got = {r["bench"]: (r["tau"], r.get("tau_ci95")) for r in mine}
            if len(got) == len(benches):
                got["mean"] = mean_with_ci(mine)
            xs, ys, err = [], [], [[], []]
            for i, b in enumerate([*benches, "mean"]):
                if b in got:
                    tau, ci = got[b]
                    xs.append(i - 0.4 + (k + 0.5) * width)
                    ys.append(tau)
                    err[0].append(tau - ci[0] if ci else 0)
                    err[1].append(ci[1] - tau if ci else 0)
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=names[v], color=colors[k % 10])
        ax.set_xticks(range(len(benches) + 1), [*benches, "mean"])
        ax.set_ylabel("tau (tokens per target forward)")
        ax.set_title(f"T={temp:g}")
        ax.set_ylim(bottom=1)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", help="also write the Markdown here")
    ap.add_argument("--figures", help="write combination_tau.png and combination_routing.png here")
    args = ap.parse_args()
    rows = load_rows(*args.dirs)
    if not rows:
        raise SystemExit(f"no results.json under {args.dirs}")
    text = report(rows)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if args.figures:
        out = Path(args.figures)
        out.mkdir(parents=True, exist_ok=True)
        tau_bars(rows, out / "combination_tau.png")
        routing_plot(rows, out / "combination_routing.png")
        print(f"figures: {out / 'combination_tau.png'}, {out / 'combination_routing.png'}")


if __name__ == "__main__":
    main()
