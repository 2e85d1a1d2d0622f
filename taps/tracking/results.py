"""A run's results as tracked tables, images and summary values (W&B, or nothing)."""

from __future__ import annotations

import logging
from pathlib import Path

from taps.report.files import COLUMNS, NODE_COLUMNS, flat, result_paths, unchanged, write_results
from taps.report.routing import ROUTING_COLUMNS, routing_table
from taps.tracking.loggers import NullRunLogger

log = logging.getLogger("taps.run")
_DEPTH_COLUMNS = ["variant", "bench", "temperature", "depth", "fraction"]


SAMPLE_COLUMNS = ["variant", "bench", "temperature", "question_id", "turn", "prompt", "text",
                  "tau", "identical_to_vanilla"]  # fmt: skip
SAMPLES = 50  # generated texts logged as a W&B table; outputs.jsonl holds them all


def publish(
    run_dir: str | Path,
    rows: list[dict],
    meta: dict,
    logger: NullRunLogger,
    outputs: list[dict] | None = None,
) -> dict[str, Path]:
    """Write the run's files and log them, unless the run dir already holds exactly these
    rows (a re-run with every cell cached: nothing new to log)."""
    if unchanged(run_dir, rows):
        log.info("%s: every cell cached and results unchanged; nothing logged", run_dir)
        return result_paths(run_dir)
    paths = write_results(run_dir, rows, meta, outputs or [])
    log_results(logger, rows, paths)
    samples = [[o.get(c) for c in SAMPLE_COLUMNS] for o in (outputs or [])[:SAMPLES]]
    if samples:
        logger.log_table("samples", SAMPLE_COLUMNS, samples)
    return paths


def log_results(logger: NullRunLogger, rows: list[dict], paths: dict[str, Path]) -> None:
    logger.log_table("tau_grid", COLUMNS, [list(flat(r).values()) for r in rows])
    logger.log_image("tau_heatmap", paths["heatmap"])
    logger.log_image("acceptance_by_depth", paths["depth"])
    logger.log_table("node_stats", NODE_COLUMNS, [[r.get(c) for c in NODE_COLUMNS] for r in rows])
    depth = [
        [r["variant"], r["bench"], r["temperature"], d + 1, x]
        for r in rows
        for d, x in enumerate(r["acceptance_by_depth"])
    ]
    logger.log_table("acceptance_by_depth", _DEPTH_COLUMNS, depth)
    if "routing" in paths:
        logger.log_image("routing_shares", paths["routing"])
        logger.log_table("routing_shares", ROUTING_COLUMNS, routing_table(rows))
    logger.log_summary({f"tau/{r['bench']}/T{r['temperature']:g}": r["tau"] for r in rows})
