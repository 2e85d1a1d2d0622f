"""One W&B run per study (group = the study) holding its whole multirun as one grid table,
its tau heatmap and the report's figures for it, so `wandb sync` gives a ready dashboard.
The jobs' own runs sit in the same group."""

from __future__ import annotations

from pathlib import Path

from taps.report.files import heatmap
from taps.tracking.loggers import WandbRunLogger

GRID_COLUMNS = ["variant", "drafter", "data", "routing", "bench", "temperature", "tau",
                "tau_ci_low", "tau_ci_high", "tokens_per_s", "verified_tokens_per_cycle",
                "draft_forwards_per_cycle"]  # fmt: skip
# The report figures (taps.study.figures.FIGURES) that belong to each study's dashboard.
STUDY_FIGURES = {
    "averaging_sweep": ["averaging_sweep"],
    "routing_signals": ["routing_shares", "entropy_bars"],
    "depth": ["depth_curves"],
}


def grid_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        lo, hi = r.get("tau_ci95") or (None, None)
        out.append([r["variant"], r["drafter"], r["data"], r["routing"], r["bench"],
                    r["temperature"], r["tau"], lo, hi, r["tokens_per_s"],
                    r["tree_tokens_per_cycle"], r["draft_forwards_per_cycle"]])  # fmt: skip
    return out


def log_study(study: str, rows: list[dict], out: Path, project: str, mode: str) -> str | None:
    """Log the study's summary run; returns its local run directory."""
    if not rows:
        return None
    logger = WandbRunLogger(project=project, mode=mode, dir=str(out / "wandb"), group=study,
                            name=f"{study}-summary")  # fmt: skip
    logger.start({"study": study, "rows": len(rows)})
    try:
        logger.log_table("grid", GRID_COLUMNS, grid_rows(rows))
        path = out / "wandb_media" / f"{study}_tau_heatmap.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        heatmap(rows, path)
        logger.log_image("tau_heatmap", path)
        for name in STUDY_FIGURES.get(study, []):
            if (out / f"{name}.png").is_file():
                logger.log_image(name, out / f"{name}.png")
        logger.log_summary({"rows": len(rows)})
        return logger.run_dir
    finally:
        logger.finish()
