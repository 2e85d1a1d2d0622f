"""Saving plots the way results are written: atomically, so a reader never sees half a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """Write `fig` to a temporary sibling, rename it over `path`, and close the figure."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
