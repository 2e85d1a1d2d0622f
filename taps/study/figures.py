"""The report's figures: each takes every study's rows and a path, draws a PNG if its study has
rows, and returns (title, caption), or (None, None) when there is nothing to draw."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from taps.report.figures import save_figure  # noqa: E402

Rows = dict[str, list[dict]]
KIND_T = (("eagle2", 0.0), ("eagle2", 1.0), ("hass", 0.0), ("hass", 1.0))
MATH = "mathinstruct"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def averaging_sweep(studies: Rows, path: Path) -> tuple[str | None, str | None]:
    rows = studies.get("averaging_sweep") or []
    if not rows:
        return None, None
    fig, ax = plt.subplots(figsize=(6, 4))
    singles = studies.get("specialization") or []
    for k, temp in enumerate(sorted({r["temperature"] for r in rows})):
        sub = [r for r in rows if r["temperature"] == temp]
        alphas = sorted({_alpha(r) for r in sub})
        means = [_mean([r["tau"] for r in sub if _alpha(r) == a]) for a in alphas]
        color = f"C{k}"
        ax.plot(alphas, means, marker="o", color=color, label=f"averaged, T={temp:g}")
        kind = sub[0]["drafter"]
        for data, style in ((MATH, "--"), ("sharegpt", ":")):
            ref = [r["tau"] for r in singles if r["drafter"] == kind and r["data"] == data
                   and r["strategy"] == "single" and r["temperature"] == temp]  # fmt: skip
            if ref:
                ax.axhline(_mean(ref), color=color, ls=style, lw=1, label=f"{data}, T={temp:g}")
    ax.set_xlabel("a (weight of the math drafter; 1 - a on ShareGPT)")
    ax.set_ylabel("mean tau over the 4 benchmarks")
    ax.set_title("checkpoint averaging sweep")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return "Checkpoint-averaging sweep", (
        "Mean tau over the four benchmarks against the mixing weight a; dashed and dotted "
        "lines: the two single-domain drafters that were averaged."
    )


def _alpha(row: dict) -> float:
    return float(row["options"]["alpha"])


def entropy_bars(studies: Rows, path: Path) -> tuple[str | None, str | None]:
    rows = [r for r in studies.get("routing_signals") or [] if r.get("accepted_entropy")]
    if not rows:
        return None, None
    groups = [(s, kind, t) for s in ("confidence", "entropy") for kind, t in KIND_T
              if any(r["strategy"] == s and r["drafter"] == kind and r["temperature"] == t
                     for r in rows)]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 2 + 1.5 * len(groups)), 4.2))
    labels = [f"{s}\n{kind}\nT={t:g}" for s, kind, t in groups]
    for ax, stat in zip(axes, ("entropy", "confidence"), strict=True):
        for j, (which, color) in enumerate((("accepted", "C2"), ("rejected", "C3"))):
            vals = [_mean([r[f"{which}_{stat}"] for r in rows if r["strategy"] == s
                           and r["drafter"] == kind and r["temperature"] == t
                           and r.get(f"{which}_{stat}") is not None])
                    for s, kind, t in groups]  # fmt: skip
            xs = [i + (j - 0.5) * 0.38 for i in range(len(groups))]
            ax.bar(xs, vals, width=0.38, color=color, label=f"{which} draft tokens")
        ax.set_xticks(range(len(groups)), labels, fontsize=7)
        ax.set_title(f"drafter {stat} at draft nodes")
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    save_figure(fig, path)
    return "Entropy and confidence of accepted and rejected draft tokens", (
        "Mean drafter entropy (left) and confidence (right) at the draft nodes the target "
        "accepted and rejected, per routing strategy, drafter kind and temperature "
        "(experiment=routing_signals), averaged over benchmarks."
    )


def depth_curves(studies: Rows, path: Path) -> tuple[str | None, str | None]:
    rows = [r for r in studies.get("depth") or [] if r.get("acceptance_by_depth")]
    if not rows:
        return None, None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    top = max(x for r in rows for x in r["acceptance_by_depth"])
    for ax, (kind, temp) in zip(axes, KIND_T, strict=True):
        for data in dict.fromkeys(r["data"] for r in rows):
            sub = [r["acceptance_by_depth"] for r in rows
                   if r["drafter"] == kind and r["temperature"] == temp and r["data"] == data]  # fmt: skip
            if sub:
                curve = [_mean([s[d] for s in sub]) for d in range(len(sub[0]))]
                ax.plot(range(1, len(curve) + 1), curve, marker="o", label=data)
        ax.set_title(f"{kind}, T={temp:g}")
        ax.set_xlabel("draft depth d")
        ax.set_ylim(0, min(1.0, 1.15 * top + 0.02))
        ax.legend(fontsize=7)
    axes[0].set_ylabel("cycles accepting >= d tokens")
    save_figure(fig, path)
    return "Acceptance by depth", (
        "Share of cycles that accepted at least d draft tokens, mean over the four benchmarks "
        "(experiment=depth)."
    )


def routing_shares(studies: Rows, path: Path) -> tuple[str | None, str | None]:
    rows = [r for r in studies.get("routing_signals") or [] if r.get("routing_shares")]
    if not rows:
        return None, None
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, strategy in zip(axes, ("confidence", "entropy"), strict=True):
        for j, (kind, temp) in enumerate(KIND_T):
            got = {r["bench"]: r["routing_shares"] for r in rows if r["strategy"] == strategy
                   and r["drafter"] == kind and r["temperature"] == temp}  # fmt: skip
            xs = [i + (j - 1.5) * 0.2 for i in range(len(benches))]
            cyc = [got[b]["cycles"].get(MATH, 0.0) if b in got else float("nan") for b in benches]
            qs = [got[b]["questions"].get(MATH, 0.0) if b in got else float("nan") for b in benches]
            ax.bar(xs, cyc, width=0.2, color=f"C{j}", label=f"{kind} T={temp:g}")
            ax.scatter(xs, qs, color="k", marker="_", s=120, zorder=3)
        ax.set_xticks(range(len(benches)), benches)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{strategy} routing: share sent to the math drafter")
        ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
    axes[0].set_ylabel("share of cycles (bars), of questions (black ticks)")
    save_figure(fig, path)
    return "Routing shares", (
        "Share of cycles (bars) and of questions by the paper's per-question rule (black "
        "ticks) routed to the MathInstruct drafter; the rest went to the ShareGPT drafter."
    )


FIGURES: dict[str, Callable[[Rows, Path], tuple[str | None, str | None]]] = {
    "averaging_sweep": averaging_sweep,
    "entropy_bars": entropy_bars,
    "depth_curves": depth_curves,
    "routing_shares": routing_shares,
}
