"""The combination grid from run directories: tau with 95% bootstrap intervals per variant x
benchmark x temperature, verification and drafting cost per cycle, routing shares, and the
paper's findings 3-6 checked against the numbers.

    python experiments/combination_table.py outputs/multiruns/<stamp> [more dirs ...] \
        [--out F.md] [--figures DIR]

Reads every results.json below the directories (single runs or multirun jobs). --figures writes
combination_tau.png (tau per variant and benchmark with its interval, one panel per
temperature) and combination_routing.png (routing shares of the routed variants).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from taps.eval.intervals import mean_difference_ci, mean_with_ci
from taps.paths import atomic_write_text
from taps.report.figures import plt, save_figure  # Agg backend: runs headless
from taps.report.routing import routing_plot

MATH_BENCHES = ("gsm8k", "math500", "svamp")


def load_rows(dirs: list[str]) -> list[dict]:
    rows = []
    for d in dirs:
        for f in sorted(Path(d).rglob("results.json")):
            rows += json.loads(f.read_text())["rows"]
    return rows


def _ci(row: dict) -> tuple[float, float] | None:
    ci = row.get("tau_ci95")
    return tuple(ci) if ci else None


def _cell(tau: float, ci: tuple[float, float] | None) -> str:
    return f"{tau:.2f}" if ci is None else f"{tau:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def grid(rows: list[dict]) -> tuple[str, dict]:
    """Markdown tables per temperature, and {temperature: {variant: mean tau}}."""
    lines, means = [], {}
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
        means[temp] = {}
        for v in variants:
            mine = [r for r in sub if r["variant"] == v]
            cells = []
            for b in benches:
                r = next((x for x in mine if x["bench"] == b), None)
                cells.append("-" if r is None else _cell(r["tau"], _ci(r)))
            mean, ci = mean_with_ci(mine)
            means[temp][v] = mean
            cost = [x["tree_tokens_per_cycle"] or 0 for x in mine]
            fwd = [x["draft_forwards_per_cycle"] or 0 for x in mine]
            tps = sum(x["new_tokens"] for x in mine) / max(
                sum(x["wall_time_s"] for x in mine), 1e-9
            )
            lines.append(
                f"| {v} | " + " | ".join(cells) + f" | {_cell(mean, ci)} "
                f"| {sum(cost) / len(cost):.1f} | {sum(fwd) / len(fwd):.1f} | {tps:.1f} |"
            )
        lines.append("")
    return "\n".join(lines), means


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


def _kind(variant: str) -> str:
    return variant.split("/")[-1] if variant.count("/") >= 2 else "single:" + variant.split("/")[1]


def _diff(a: list[dict], b: list[dict]) -> tuple[float, tuple[float, float] | None, str]:
    """(difference of mean tau, paired interval, its text)."""
    d, ci = mean_difference_ci(a, b)
    if ci is None:
        return d, None, f"{d:+.2f}"
    tag = "resolved" if ci[0] > 0 or ci[1] < 0 else "not resolved"
    return d, ci, f"{d:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}], {tag}"


def _claim(name: str, pairs: list[tuple[str, list[dict], list[dict]]]) -> str:
    """Verdict on "a > b for every pair", graded by the paired intervals."""
    diffs = [(label, *_diff(a, b)) for label, a, b in pairs]
    holds = all(d > 0 for _, d, _, _ in diffs)
    if holds and all(ci and ci[0] > 0 for _, _, ci, _ in diffs):
        verdict = "holds, every difference resolved"
    elif holds:
        verdict = "holds in the means, not every difference resolved"
    elif any(ci and ci[1] < 0 for _, _, ci, _ in diffs):
        verdict = "does not hold, resolved against"
    else:
        verdict = "does not hold in the means, the reversal not resolved"
    return f"  - {name}: {verdict} ({'; '.join(f'{lb}: {t}' for lb, _, _, t in diffs)})"


def _findings_3_to_5(rows: list[dict], temp: float, head: str, m: dict[str, float]) -> list[str]:
    """Findings 3-5 on the rows of one drafter kind at one temperature; the single drafters
    compared are the combinations' components (not, say, a drafter trained on the mixture)."""
    by = {_kind(v): x for v, x in m.items()}
    of = {_kind(v): [r for r in rows if r["variant"] == v] for v in m}
    combos = [k for k in by if not k.startswith("single:")]
    parts = {d for k in combos for r in of[k] for d in r.get("drafters") or []}
    singles = [k for k in by if k.startswith("single:") and k[len("single:") :] in parts]
    avg = [k for k in combos if k.startswith("average")]
    shown = [k for k in by if not k.startswith("single:") or k in singles]
    fmt = ", ".join(f"{k} {by[k]:.2f}" for k in sorted(shown, key=lambda k: -by[k]))
    out = [f"- {head}, T={temp:g}, mean tau: {fmt}"]
    if avg:
        a = avg[0]
        others = [k for k in shown if k != a]
        out.append(_claim("3 (averaging is the worst variant)",
                          [(f"{k} - {a}", of[k], of[a]) for k in others]))  # fmt: skip
    if "confidence" in by and singles:
        out.append(_claim("4 (confidence beats each single drafter on average)",
                          [(f"confidence - {k}", of["confidence"], of[k]) for k in singles]))  # fmt: skip
    full, matched = "merged_tree(full)", "merged_tree(matched)"
    if full in by and len(combos) > 1:
        out.append(_claim("5 (merged trees give the highest tau of the combinations)",
                          [(f"{full} - {k}", of[full], of[k]) for k in combos if k != full]))  # fmt: skip
    if matched in by and "confidence" in by:
        # Same cost per cycle: both draft with every head and verify one tree's budget.
        out.append(f"  - at equal cost (one tree's verified tokens, every head drafting): "
                   f"{matched} - confidence: {_diff(of[matched], of['confidence'])[2]}")  # fmt: skip
    return out


def _finding_6(rows: list[dict]) -> list[str]:
    """Finding 6 on the rows of one drafter kind at one temperature."""
    out = []
    sub = [r for r in rows if r.get("accepted_entropy") is not None and r.get("rejected_entropy")]
    if sub:
        higher = sum(r["rejected_entropy"] > r["accepted_entropy"] for r in sub)
        acc = sum(r["accepted_entropy"] for r in sub) / len(sub)
        rej = sum(r["rejected_entropy"] for r in sub) / len(sub)
        out.append(f"  - 6b (rejected draft tokens have higher entropy than accepted ones): "
                   f"{higher}/{len(sub)} rows (mean entropy accepted {acc:.2f}, rejected {rej:.2f})")  # fmt: skip
    clear = {}
    for r in rows:
        sh = (r.get("routing_shares") or {}).get("questions")
        kind = _kind(r["variant"])
        if sh and kind in ("confidence", "entropy"):
            want = "mathinstruct" if r["bench"] in MATH_BENCHES else "sharegpt"
            clear.setdefault(kind, []).append(sh.get(want, 0.0))
    if clear:
        parts = {k: sum(v) / len(v) for k, v in clear.items()}
        out.append("  - 6a (confidence is a clearer routing signal than entropy): share of "
                   "questions routed to the in-domain drafter (math benchmarks -> mathinstruct, "
                   "MT-Bench -> sharegpt): " + ", ".join(f"{k} {x:.2f}" for k, x in parts.items()))  # fmt: skip
    return out


def findings(rows: list[dict], means: dict) -> str:
    """Findings 3-6 of ../shared/docs/PAPER.md, each stated with the numbers it rests on.
    Differences between variants carry paired 95% bootstrap intervals over the shared
    prompts; "resolved" means the interval excludes zero."""
    out = ["### paper findings 3-6 at this scale", "",
           "Differences are mean tau over benchmarks, with paired 95% bootstrap intervals over "
           "prompts.", ""]  # fmt: skip
    for temp, m in means.items():
        for head in dict.fromkeys(v.split("/")[0] for v in m):  # eagle2, hass: never mixed
            mine = [r for r in rows
                    if r["temperature"] == temp and r["variant"].split("/")[0] == head]  # fmt: skip
            out += _findings_3_to_5(mine, temp, head, {v: x for v, x in m.items()
                                                       if v.split("/")[0] == head})  # fmt: skip
            out += _finding_6(mine)
    return "\n".join(out) + "\n"


def report(rows: list[dict]) -> str:
    """The Markdown the script prints: tau grid, routing shares, findings."""
    table, means = grid(rows)
    return "\n".join([table, shares_table(rows), findings(rows, means)])


def tau_bars(rows: list[dict], path: Path) -> None:
    """Grouped bars: tau per benchmark (and the mean), one bar per variant, 95% intervals."""
    temps = sorted({r["temperature"] for r in rows})
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(len(temps), 1, figsize=(11, 3.6 * len(temps)), squeeze=False)
    width = 0.8 / len(variants)
    colors = plt.get_cmap("tab10").colors
    for ax, temp in zip(axes[:, 0], temps, strict=True):
        for k, v in enumerate(variants):
            mine = [r for r in rows if r["variant"] == v and r["temperature"] == temp]
            got = {r["bench"]: (r["tau"], _ci(r)) for r in mine}
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
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=_kind(v), color=colors[k % 10])
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
    rows = load_rows(args.dirs)
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
