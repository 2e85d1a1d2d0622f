"""`python -m taps.run`: train what is missing, evaluate the benchmark x temperature grid, and
write results.json / .csv / .md and a heatmap into the Hydra run dir (and to W&B)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from taps.combine import build_proposer
from taps.config import CONF_DIR
from taps.data.benchmarks import load_benchmark
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.drafting import TreeSpec
from taps.eval.evaluate import run_bench, summarise
from taps.eval.report import COLUMNS, NODE_COLUMNS, flat, write_results
from taps.training.train import ensure_drafter

log = logging.getLogger("taps.run")


def temperatures(cfg: DictConfig) -> list[float]:
    t = cfg.temperature
    return [float(x) for x in t] if isinstance(t, ListConfig | list) else [float(t)]


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True))
    try:
        target = instantiate(cfg.target)
        data_dir = cfg.paths.data_dir
        head, head_meta = ensure_drafter(
            target,
            cfg.drafter,
            cfg.data,
            cfg.trainer,
            cfg.paths.cache_dir,
            data_dir,
            cfg.seed,
            logger.lightning_logger(),
        )
        if cfg.eval.get("dtype"):  # serve in another precision than training used
            dtype = getattr(torch, cfg.eval.dtype)
            target.model.to(dtype)
            head.to(dtype)
        spec = TreeSpec(cfg.tree.top_k, cfg.tree.depth, cfg.tree.total_tokens)
        decoder = SpeculativeDecoder(
            target.model, build_proposer(cfg.routing.name, [head], spec), target.eos_ids
        )
        variant = f"{cfg.drafter.name}/{cfg.data.name}"
        rows = []
        for temp in temperatures(cfg):
            for bench in cfg.bench.benchmarks:
                prompts = load_benchmark(bench, data_dir, cfg.bench.limit, cfg.bench.get("path"))
                result = run_bench(
                    decoder,
                    target.tokenizer,
                    bench,
                    prompts,
                    cfg.max_new_tokens,
                    temp,
                    cfg.top_p,
                    cfg.seed,
                    cfg.eval.verify_lossless,
                    cfg.eval.near_tie,
                    cfg.eval.record_nodes,
                )
                row = {
                    "variant": variant,
                    "routing": cfg.routing.name,
                    "drafter": cfg.drafter.name,
                    "data": cfg.data.name,
                    "tree": cfg.tree.name,
                    **summarise(result, spec.depth + 1),
                }
                log.info(
                    "%s %s T=%g: tau %.3f (%d turns, %.1f tok/s)",
                    variant,
                    bench,
                    temp,
                    row["tau"],
                    row["turns"],
                    row["tokens_per_s"],
                )
                rows.append(row)
        meta = {
            "target": target.name,
            "drafter": head_meta,
            "max_new_tokens": cfg.max_new_tokens,
            "tau_definition": "new tokens / target forwards, prefill included, over all "
            "turns of a benchmark (token-weighted)",
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        paths = write_results(run_dir, rows, meta)
        logger.log_table("tau_grid", COLUMNS, [list(flat(r).values()) for r in rows])
        logger.log_image("tau_heatmap", paths["heatmap"])
        logger.log_image("acceptance_by_depth", paths["depth"])
        logger.log_table(
            "node_stats", NODE_COLUMNS, [[r.get(c) for c in NODE_COLUMNS] for r in rows]
        )
        depth_cols = ["variant", "bench", "temperature", "depth", "fraction"]
        logger.log_table(
            "acceptance_by_depth",
            depth_cols,
            [
                [r["variant"], r["bench"], r["temperature"], d + 1, x]
                for r in rows
                for d, x in enumerate(r["acceptance_by_depth"])
            ],
        )
        logger.log_summary({f"tau/{r['bench']}/T{r['temperature']:g}": r["tau"] for r in rows})
    finally:
        logger.finish()
    print(
        f"\nresults: {paths['json']}\n  table: {paths['md']}\n  csv:   {paths['csv']}\n"
        f"  plots: {paths['heatmap']}\n         {paths['depth']}"
    )
    if logger.run_dir:
        print(f"  W&B offline run: {Path(logger.run_dir).parent}  (upload: wandb sync <dir>)")
    print(Path(paths["md"]).read_text())
    return {"rows": rows, "paths": paths}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
