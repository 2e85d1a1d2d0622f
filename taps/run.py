"""`python -m taps.run`: train what is missing, evaluate the benchmark x temperature grid, and
write results.json / .csv / .md and plots into the Hydra run dir (and to W&B).

The composition root: each part is built from its config node (`_target_`), and the layers do
the work: data (which drafters), training (train or load them), combine (the strategy),
engine (the decoder), eval (the grid), report and tracking (files and W&B)."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from taps.config import CONF_DIR
from taps.data.conversations import DataError
from taps.eval.ties import LosslessError, check_lossless
from taps.paths import IntegrityError
from taps.settings import SettingsError, validate


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Build the parts, evaluate the grid, write and log the results; returns rows and paths."""
    validate(cfg)  # every setting, before anything is loaded or trained
    # The layers import torch and Lightning (seconds): here, so --help answers at once.
    import torch

    from taps.combine import check_sampled, strategy
    from taps.data.drafters import drafter_data
    from taps.engine.decoder import SpeculativeDecoder
    from taps.eval import grid
    from taps.models.precision import cast_for_serving
    from taps.models.target import shared_target
    from taps.report.files import describe, run_meta
    from taps.tracking.results import publish
    from taps.training.train import build_callbacks, ensure_drafter

    conf = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(cfg.seed)
    ev, bench = cfg.eval, cfg.bench
    decoding = grid.Decoding(cfg.max_new_tokens, cfg.top_p, cfg.seed, ev.verify_lossless,
                             ev.near_tie, ev.record_nodes)  # fmt: skip
    prompts = grid.load_prompts(bench.benchmarks, cfg.paths.data_dir, bench.limit,
                                bench.get("path"), bench.get("stream"))  # fmt: skip
    combine, spec = strategy(instantiate(cfg.routing)), instantiate(cfg.tree)
    check_sampled(combine.name, spec)  # before any drafter trains
    datas = drafter_data(cfg.data, cfg.drafters, combine.combines)
    target, tracker = shared_target(cfg.target), instantiate(cfg.logger)
    tracker.start(conf)
    try:
        trained = [
            ensure_drafter(target, cfg.drafter, data, cfg.trainer, cfg.paths.cache_dir,
                           cfg.paths.data_dir, cfg.seed, tracker.lightning_logger,
                           build_callbacks(cfg.callbacks))
            for data in datas
        ]  # fmt: skip
        heads, metas = [h for h, _ in trained], [m for _, m in trained]
        proposer = combine(heads, spec)  # built (averaged) in the training precision, then cast
        cast_for_serving(ev.dtype, target.model, proposer.heads, ev.exact)
        decoder = SpeculativeDecoder(target.model, proposer, target.eos_ids,
                                     lazy_logits_from=ev.lazy_logits_from)  # fmt: skip
        names = [str(d.name) for d in datas]
        labels = grid.variant_labels(cfg.drafter.name, cfg.data.name, names, combine, spec.name)
        parts = grid.cell_parts(target, metas, combine, spec, decoding, conf["eval"])
        result = grid.evaluate_grid(
            decoder, target.tokenizer, prompts, grid.temperatures(cfg.temperature), decoding,
            cfg.paths.cache_dir, parts, labels, spec.depth + 1,
        )  # fmt: skip
        meta = run_meta(target.name, names, metas, cfg.max_new_tokens, conf)
        paths = publish(run_dir, result.rows, meta, tracker, result.outputs)
    finally:
        tracker.finish()
    print(describe(paths, tracker.run_dir))
    check_lossless(result.rows, str(run_dir))  # after writing: the results show what diverged
    return {"rows": result.rows, "paths": paths, "decoded": result.decoded}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    n_jobs = hc.launcher.get("n_jobs") if "launcher" in hc else None
    if n_jobs and n_jobs > 1:  # parallel sweep jobs share the cores instead of fighting for them
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))
    if "name" in cfg.logger and cfg.logger.name is None and hc.job.override_dirname:
        with open_dict(cfg):  # a sweep job's W&B run is named by its overrides
            cfg.logger.name = hc.job.override_dirname
    try:
        run(cfg, hc.runtime.output_dir)
    except (SettingsError, DataError, IntegrityError, LosslessError) as e:
        raise SystemExit(f"error: {e}") from None  # a finding to act on, not a crash to debug


if __name__ == "__main__":
    main()
