"""Held-out learning curves of trained drafters: top-1 at each draft depth and the simulated
chain acceptance length at every validation pass, against the training examples seen.

    python experiments/learning_curve.py .cache/drafters/<entry> [more entries ...] [--plot F]

Reads each drafter's metrics.csv (every validation pass, `trainer.val_check_interval`) and
config.json (examples per epoch). Where a curve flattens, more examples x epochs stop paying.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from taps.report.figures import plt, save_figure

COLUMNS = ["val/top1_d1", "val/top1_d2", "val/top1_d3", "val/top1_d5", "val/sim_tau"]


def curve(entry: Path) -> tuple[str, list[dict]]:
    meta = json.loads((entry / "config.json").read_text())
    examples = meta["data"]["train_features"]["examples"]
    steps_per_epoch = max(1, -(-examples // int(meta["drafter"]["batch_size"])))
    points = []
    with open(entry / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/sim_tau"):
                seen = int(float(row["step"]) + 1) / steps_per_epoch * examples
                points.append({"examples_seen": round(seen), **{c: float(row[c]) for c in COLUMNS
                                                                 if row.get(c)}})  # fmt: skip
    ttt = meta["drafter"].get("ttt_steps")
    label = f"{meta['drafter']['name']}" + (f" TTT {ttt}" if ttt else "") + f" {entry.name[-8:]}"
    return label, points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("entries", nargs="+")
    ap.add_argument("--plot")
    args = ap.parse_args()
    curves = [curve(Path(e)) for e in args.entries]
    print("| drafter | examples seen | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for label, points in curves:
        for p in points:
            cells = [f"{p[c]:.3f}" if c in p else "-" for c in COLUMNS]
            print(f"| {label} | {p['examples_seen']} | " + " | ".join(cells) + " |")
    if args.plot:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, points in curves:
            ax.plot([p["examples_seen"] for p in points], [p["val/sim_tau"] for p in points],
                    marker="o", label=label)  # fmt: skip
        ax.set_xlabel("training examples seen (examples x epochs)")
        ax.set_ylabel("held-out simulated chain tau")
        ax.legend(fontsize=8)
        save_figure(fig, Path(args.plot))


if __name__ == "__main__":
    main()
