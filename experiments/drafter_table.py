"""One table of drafters from run directories: training cost, held-out metrics and tau.

    python experiments/drafter_table.py outputs/multiruns/<timestamp> [more run dirs ...]

Reads every results.json below the given directories (a multirun's jobs or single runs).
"""

from __future__ import annotations

import sys

from taps.report.rows import results_files, rows_of


def rows(paths: list[str]) -> list[dict]:
    out = []
    for f, res in results_files(*paths):
        meta = res["drafter"]
        if meta is None:  # a combination of several drafters: see combination_table.py
            continue
        found = rows_of(res, f)
        data = meta.get("data", {})
        fm = meta.get("final_metrics", {})
        row = {
            "drafter": meta["drafter"]["name"],
            "data": found[0]["data"],
            "tree": found[0].get("tree"),
            "T": found[0]["temperature"],
            "regenerate": "regenerated" in data,
            "draft_vocab": meta.get("draft_vocab"),
            "train_tokens": data.get("train_features", {}).get("tokens"),
            "features_s": data.get("train_features", {}).get("seconds"),
            "train_s": meta.get("train_seconds"),
            "top1_d1": fm.get("val/top1_d1", fm.get("val/top1")),
            "top1_d2": fm.get("val/top1_d2"),
            "top1_d3": fm.get("val/top1_d3"),
            "top1_d5": fm.get("val/top1_d5"),
            "sim_tau": fm.get("val/sim_tau"),
            "run": str(f.parent),
        }
        for r in found:
            ci = r.get("tau_ci95")
            row[f"tau {r['bench']}"] = (
                r["tau"] if not ci else f"{r['tau']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
            )
            row[f"tok/s {r['bench']}"] = r.get("tokens_per_s")
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    cols = [c for c in table[0] if c != "run"] if table else []
    for r in table[1:]:
        cols += [c for c in r if c not in cols and c != "run"]

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    table = sorted(
        rows(sys.argv[1:]), key=lambda r: (r["data"], r["drafter"], str(r["tree"]), r["T"])
    )
    print(markdown(table))
