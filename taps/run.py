"""`python -m taps.run`: train what is missing, evaluate the benchmark x temperature grid, and
write results.json / .csv / .md and a heatmap into the Hydra run dir (and to W&B)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from taps.combine import build_proposer
from taps.config import CONF_DIR
from taps.data.benchmarks import load_benchmark
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.drafting import TreeSpec
from taps.eval.cells import cell_key, load_cell, store_cell
from taps.eval.evaluate import run_bench, summarise
from taps.models.precision import cast_for_serving
from taps.models.target import Target
from taps.paths import content_key
from taps.report.files import COLUMNS, NODE_COLUMNS, flat, result_paths, write_results
from taps.report.routing import ROUTING_COLUMNS, routing_table
from taps.tracking.loggers import NullRunLogger
from taps.training.train import ensure_drafter

log = logging.getLogger("taps.run")


def temperatures(cfg: DictConfig) -> list[float]:
    t = cfg.temperature
    return [float(x) for x in t] if isinstance(t, ListConfig | list) else [float(t)]


_ROUTING_KEYS = {"name", "label", "drafters"}  # routing keys that are not strategy options


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def drafter_data(cfg: DictConfig) -> list[DictConfig]:
    """The data config of each drafter the strategy needs. routing=single trains on `data`
    unless routing.drafters names one; the others combine one drafter per component of `data`
    (or per entry of routing.drafters), each trained on the data config of that name with the
    mixture's settings (budget, max_len, ...), so it is the same cached drafter that
    `data=<name>` trains. A list entry may also be an inline data config (a mapping)."""
    names = cfg.routing.get("drafters")
    if names is None:
        if cfg.routing.name == "single":
            return [cfg.data]
        names = [c.source for c in cfg.data.components]
    shared = {k: v for k, v in _plain(cfg.data).items() if k not in ("name", "components")}
    out = []
    for entry in names:
        if isinstance(entry, str):
            path = Path(CONF_DIR) / "data" / f"{entry}.yaml"
            if not path.is_file():
                raise ValueError(
                    f"routing.drafters: no data config {path} for drafter {entry!r} (one "
                    "drafter per mixture component needs conf/data/<component>.yaml)"
                )
            base = OmegaConf.load(path)
        else:
            base = OmegaConf.create(_plain(entry) if isinstance(entry, DictConfig) else entry)
            if "name" not in base or "components" not in base:
                raise ValueError(f"routing.drafters: inline entry {entry} needs name, components")
        out.append(OmegaConf.merge(base, shared))
    return out


_TARGETS: dict[str, tuple] = {}  # config key -> (target, dtype as loaded), for a whole sweep


def load_target(cfg: DictConfig) -> Target:
    """The target of cfg.target as loaded. A multirun's jobs share one process (basic
    launcher), so they share the loaded model too; a job that cast it to another eval.dtype
    for serving makes the next job load it afresh (casting back would not restore it)."""
    memo = content_key(_plain(cfg.target))
    target, dtype = _TARGETS.get(memo, (None, None))
    if target is None or target.model.lm_head.weight.dtype != dtype:
        target = instantiate(cfg.target)
        _TARGETS[memo] = (target, target.model.lm_head.weight.dtype)
    return target


def _cell_parts(cfg: DictConfig, target, metas: list[dict], spec: TreeSpec, options: dict) -> dict:
    """What a benchmark x temperature cell's row depends on, besides the bench and temperature
    (taps/eval/cells.py adds the code)."""
    return {
        "target": target.key,
        "drafters": [m.get("key") or content_key(m) for m in metas],
        "routing": cfg.routing.name,
        "options": options,
        "tree": [spec.top_k, spec.depth, spec.total_tokens],
        "max_new_tokens": cfg.max_new_tokens,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "dtype": str(target.model.lm_head.weight.dtype),
        "eval": _plain(cfg.eval),
    }


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True))
    try:
        out = _run(cfg, run_dir, logger)
    finally:
        logger.finish()
    paths = out["paths"]
    if "routing" in paths:
        print(f"routing shares: {paths['routing']}")
    print(
        f"\nresults: {paths['json']}\n  table: {paths['md']}\n  csv:   {paths['csv']}\n"
        f"  plots: {paths['heatmap']}\n         {paths['depth']}"
    )
    if logger.run_dir:
        print(f"  W&B offline run: {Path(logger.run_dir).parent}  (upload: wandb sync <dir>)")
    print(Path(paths["md"]).read_text())
    return out


def _run(cfg: DictConfig, run_dir: Path, logger) -> dict:
    target = load_target(cfg)
    data_dir = cfg.paths.data_dir
    sources = drafter_data(cfg)
    heads, metas = [], []
    for data in sources:
        head, head_meta = ensure_drafter(
            target,
            cfg.drafter,
            data,
            cfg.trainer,
            cfg.paths.cache_dir,
            data_dir,
            cfg.seed,
            logger.lightning_logger,  # called only if a drafter must be trained
        )
        heads.append(head)
        metas.append(head_meta)
    spec = TreeSpec(cfg.tree.top_k, cfg.tree.depth, cfg.tree.total_tokens)
    options = {k: v for k, v in _plain(cfg.routing).items() if k not in _ROUTING_KEYS}
    # Train and combine (averaging) in the training precision, then cast for serving.
    proposer = build_proposer(cfg.routing.name, heads, spec, **options)
    cast_for_serving(cfg.eval.get("dtype"), target.model,
                     [d.head for d in getattr(proposer, "drafters", [proposer])])  # fmt: skip
    decoder = SpeculativeDecoder(target.model, proposer, target.eos_ids,
                                 lazy_logits_from=cfg.eval.get("lazy_logits_from"))  # fmt: skip
    names = [str(d.name) for d in sources]
    label = cfg.routing.get("label", cfg.routing.name)
    data_name = names[0] if len(names) == 1 else cfg.data.name
    variant = f"{cfg.drafter.name}/{data_name}" + ("" if label == "single" else f"/{label}")
    parts = _cell_parts(cfg, target, metas, spec, options)
    rows, decoded = [], 0
    for temp in temperatures(cfg):
        for bench in cfg.bench.benchmarks:
            prompts = load_benchmark(bench, data_dir, cfg.bench.limit, cfg.bench.get("path"))
            cell = {**parts, "bench": bench, "temperature": temp,
                    "prompts": [[q.question_id, q.turns] for q in prompts]}  # fmt: skip
            key = cell_key(**cell)
            summary = load_cell(cfg.paths.cache_dir, key)
            cached = summary is not None
            if not cached:
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
                summary = summarise(result, spec.depth + 1, names)
                store_cell(cfg.paths.cache_dir, key, summary, cell)
                decoded += 1
            row = {
                "variant": variant,
                "routing": label,
                "drafter": cfg.drafter.name,
                "data": data_name,
                "drafters": names,
                "tree": cfg.tree.name,
                **summary,
                "cell": key,
            }
            log.info(
                "%s %s T=%g: tau %.3f (%d turns, %.1f tok/s)%s",
                variant,
                bench,
                temp,
                row["tau"],
                row["turns"],
                row["tokens_per_s"],
                " [cached]" if cached else "",
            )
            rows.append(row)
    meta = {
        "target": target.name,
        "drafter": metas[0] if len(metas) == 1 else None,
        "drafters": dict(zip(names, metas, strict=True)),
        "max_new_tokens": cfg.max_new_tokens,
        "tau_definition": "new tokens / target forwards, prefill included, over all "
        "turns of a benchmark (token-weighted)",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if _unchanged(run_dir, rows):  # a re-run with every cell cached: nothing new to log
        log.info("%s: every cell cached and results unchanged; nothing logged", run_dir)
        return {"rows": rows, "paths": result_paths(run_dir), "decoded": decoded}
    paths = write_results(run_dir, rows, meta)
    log_results(logger, rows, paths)
    return {"rows": rows, "paths": paths, "decoded": decoded}


def _unchanged(run_dir: Path, rows: list[dict]) -> bool:
    try:
        old = json.loads((run_dir / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return False
    return json.dumps(old, sort_keys=True, default=str) == json.dumps(
        rows, sort_keys=True, default=str
    ) and all(p.is_file() for k, p in result_paths(run_dir).items() if k != "routing")


def log_results(logger: NullRunLogger, rows: list[dict], paths: dict[str, Path]) -> None:
    logger.log_table("tau_grid", COLUMNS, [list(flat(r).values()) for r in rows])
    logger.log_image("tau_heatmap", paths["heatmap"])
    logger.log_image("acceptance_by_depth", paths["depth"])
    logger.log_table("node_stats", NODE_COLUMNS, [[r.get(c) for c in NODE_COLUMNS] for r in rows])
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
    if "routing" in paths:
        logger.log_image("routing_shares", paths["routing"])
        logger.log_table("routing_shares", ROUTING_COLUMNS, routing_table(rows))
    logger.log_summary({f"tau/{r['bench']}/T{r['temperature']:g}": r["tau"] for r in rows})


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    n_jobs = hc.launcher.get("n_jobs") if "launcher" in hc else None
    if n_jobs and n_jobs > 1:  # parallel sweep jobs share the cores instead of fighting for them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
    if "name" in cfg.logger and cfg.logger.name is None and hc.job.override_dirname:
        with open_dict(cfg):  # a sweep job's W&B run is named by its overrides
            cfg.logger.name = hc.job.override_dirname
    run(cfg, hc.runtime.output_dir)


if __name__ == "__main__":
    main()
