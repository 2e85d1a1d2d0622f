"""Routing analysis: which drafter the routed strategies chose, per benchmark, as a table and a
stacked bar plot (share of cycles and share of questions, the paper's per-question rule)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from taps.report.figures import save_figure  # noqa: E402

ROUTING_COLUMNS = ["variant", "bench", "temperature", "unit", "drafter", "share"]


def routing_table(rows: list[dict]) -> list[list]:
    """One line per (row, unit in {cycles, questions}, drafter) for rows that were routed."""
    out = []
    for r in rows:
        for unit, shares in (r.get("routing_shares") or {}).items():
            for drafter, share in shares.items():
                out.append([r["variant"], r["bench"], r["temperature"], unit, drafter, share])
    return out


def routing_plot(rows: list[dict], path: str | Path) -> bool:
    """Stacked bars, one per (variant, benchmark, temperature); False if nothing was routed."""
    routed = [r for r in rows if r.get("routing_shares")]
    if not routed:
        return False
    drafters = list(dict.fromkeys(d for r in routed for d in r["routing_shares"]["cycles"]))
    labels = [f"{r['routing']} {r['bench']} T={r['temperature']:g}" for r in routed]
    # One panel above the other, legend outside: side by side, a grid's 16 bars made the
    # figure 30 inches wide and the legend covered the last bars.
    fig, axes = plt.subplots(2, 1, figsize=(2 + 0.6 * len(routed), 8), sharex=True)
    colors = plt.get_cmap("tab10").colors
    for ax, unit in zip(axes, ("cycles", "questions"), strict=True):
        bottom = [0.0] * len(routed)
        for k, d in enumerate(drafters):
            vals = [r["routing_shares"][unit].get(d, 0.0) for r in routed]
            ax.bar(range(len(routed)), vals, bottom=bottom, label=d, color=colors[k % 10])
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylim(0, 1)
        ax.set_ylabel("share")
        ax.set_title(f"share of {unit} routed to each drafter")
    axes[1].set_xticks(range(len(routed)), labels, rotation=40, ha="right", fontsize=8)
    axes[0].legend(title="drafter", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)
    return True
