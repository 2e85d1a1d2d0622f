"""The combination grid from run directories: tau with 95% bootstrap intervals per variant x
benchmark x temperature, verification and drafting cost per cycle, routing shares, and the
paper's findings 3-6 checked against the numbers.

    python experiments/combination_table.py outputs/multiruns/<stamp> [more dirs ...] [--out F]

Reads every results.json below the directories (single runs or multirun jobs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from taps.eval.paper import mean_with_ci

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


def findings(rows: list[dict], means: dict) -> str:
    """Findings 3-6 of ../shared/docs/PAPER.md, each stated with the numbers it rests on."""
    out = ["### paper findings 3-6 at this scale", ""]
    for temp, m in means.items():
        by = {_kind(v): x for v, x in m.items()}
        singles = {k: x for k, x in by.items() if k.startswith("single:")}
        avg = {k: x for k, x in by.items() if k.startswith("average")}
        combos = {k: x for k, x in by.items() if not k.startswith("single:")}
        fmt = ", ".join(f"{k} {x:.2f}" for k, x in sorted(by.items(), key=lambda kv: -kv[1]))
        out.append(f"- T={temp:g}, mean tau: {fmt}")
        if avg:
            worst = min(by, key=by.get)
            holds = worst in avg
            out.append(f"  - 3 (averaging is the worst variant): {'holds' if holds else 'does not hold'}"
                       f" (worst: {worst} {by[worst]:.2f})")  # fmt: skip
        if "confidence" in by and singles:
            holds = all(by["confidence"] > x for x in singles.values())
            out.append(f"  - 4 (confidence beats each single drafter on average): "
                       f"{'holds' if holds else 'does not hold'} (confidence {by['confidence']:.2f}"
                       f" vs {', '.join(f'{k} {x:.2f}' for k, x in singles.items())})")  # fmt: skip
        merged = {k: x for k, x in combos.items() if k.startswith("merged_tree")}
        if merged and len(combos) > len(merged):
            best = max(combos, key=combos.get)
            full = merged.get("merged_tree(full)")
            holds = full is not None and best == "merged_tree(full)"
            out.append(f"  - 5 (merged trees give the highest tau of the combinations): "
                       f"{'holds' if holds else 'does not hold'} (best combination: {best} "
                       f"{combos[best]:.2f})")  # fmt: skip
    sub = [r for r in rows if r.get("accepted_entropy") is not None and r.get("rejected_entropy")]
    if sub:
        higher = sum(r["rejected_entropy"] > r["accepted_entropy"] for r in sub)
        acc = sum(r["accepted_entropy"] for r in sub) / len(sub)
        rej = sum(r["rejected_entropy"] for r in sub) / len(sub)
        out.append(f"- 6b (rejected draft tokens have higher entropy than accepted ones): "
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
        out.append("- 6a (confidence is a clearer routing signal than entropy): share of questions "
                   "routed to the in-domain drafter (math benchmarks -> mathinstruct, MT-Bench -> "
                   "sharegpt): " + ", ".join(f"{k} {x:.2f}" for k, x in parts.items()))  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args()
    rows = load_rows(args.dirs)
    if not rows:
        raise SystemExit(f"no results.json under {args.dirs}")
    table, means = grid(rows)
    text = "\n".join([table, shares_table(rows), findings(rows, means)])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
