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


def weights_plot(rows: list[dict], path: str | Path) -> bool:
    """Each routed row's per-cycle routing weights over its session (one panel a row), the
    source of each cycle's prompt shaded behind: how an online router follows a mixed stream.
    False if no row has a trajectory."""
    traced = [r for r in rows if (r.get("route_trajectory") or {}).get("cycle")]
    if not traced:
        return False
    fig, axes = plt.subplots(len(traced), 1, figsize=(11, 2.4 * len(traced)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    shades = plt.get_cmap("Pastel2").colors
    for ax, r in zip(axes[:, 0], traced, strict=True):
        t = r["route_trajectory"]
        names = r.get("drafters") or [str(i) for i in range(len(t["scores"][0]))]
        sources = list(dict.fromkeys(t["source"]))
        start = 0
        for i in range(1, len(t["cycle"]) + 1):  # shade each run of one source
            if i == len(t["cycle"]) or t["source"][i] != t["source"][start]:
                end = t["cycle"][i] if i < len(t["cycle"]) else t["cycle"][-1]
                k = sources.index(t["source"][start]) if len(sources) <= 8 else 0
                ax.axvspan(t["cycle"][start], end, color=shades[k % 8], lw=0)
                start = i
        for d, name in enumerate(names):
            ax.plot(t["cycle"], [s[d] for s in t["scores"]], color=colors[d % 10], lw=1, label=name)
        ax.set_title(f"{r['routing']} {r['bench']} T={r['temperature']:g}", fontsize=9)
        ax.set_ylabel("weight / score")
        handles = [plt.Rectangle((0, 0), 1, 1, color=shades[k % 8]) for k in range(len(sources))]
        if len(sources) <= 8:
            ax.legend(ax.get_legend_handles_labels()[0] + handles, names + sources, fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.01, 1))  # fmt: skip
    axes[-1, 0].set_xlabel("decoding cycle in the session")
    save_figure(fig, path)
    return True
