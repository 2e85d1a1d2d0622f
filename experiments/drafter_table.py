"""One table of drafters from run directories: training cost, held-out metrics and tau.

    python experiments/drafter_table.py outputs/multiruns/<timestamp> [more run dirs ...]

Reads every results.json below the given directories (a multirun's jobs or single runs).
"""

from __future__ import annotations

import sys

from taps.report.rows import results_files, rows_of


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean over questions: the noise level of a tau."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


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
            "regenerate": "regenerated" in data,
            "draft_vocab": meta.get("draft_vocab"),
            "train_tokens": data.get("train_features", {}).get("tokens"),
            "features_s": data.get("train_features", {}).get("seconds"),
            "train_s": meta.get("train_seconds"),
            "top1_d1": fm.get("val/top1_d1", fm.get("val/top1")),
            "sim_tau": fm.get("val/sim_tau"),
            "run": str(f.parent),
        }
        for r in found:
            row[f"tau {r['bench']}"] = r["tau"]
            per_q = list((r.get("tau_per_question") or {}).values())
            row[f"+- {r['bench']}"] = _stderr(per_q)
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
    print(markdown(rows(sys.argv[1:])))
