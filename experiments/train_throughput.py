"""Training throughput of a draft head on SmolLM2 features, per objective and vocabulary.

    python experiments/train_throughput.py [--steps 40] [--vocab 8192] [--eagle3-only] [--examples N]

Runs EAGLE-2 and HASS steps (full and draft vocabulary), then EAGLE-3 steps at several
training-time-test depths, with features read from the cache (the target's argmax as the feature
pass stored it, and, as a baseline, computed every step from f_next) and computed online by the
frozen target per batch (data.features=online). AdamW, batch 4 of the real data, bf16 autocast where
bf16 is native (as trainer.precision=auto does), one process. Prints tokens/s, the ratio to
EAGLE-2 with the full vocabulary and the peak memory of each (process RSS above the level
before). Features come from the cache (computed once for data=mathinstruct if missing; the
feature pass's own tokens/s and the cache's size on disk are printed).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from taps.config import CONF_DIR, register_resolvers
from taps.data.mixture import build_mixture, select_budget
from taps.memory import PeakMemory, limit_heap_growth, release_memory
from taps.models.eagle3_head import default_aux_layers
from taps.models.heads import build_head
from taps.models.precision import resolve_dtype, resolve_precision
from taps.models.target import Target, load_smollm2
from taps.paths import default_cache_dir, default_data_dir
from taps.training.datamodule import FeatureDataModule
from taps.training.features import FeatureSet, OnlineFeatures, cached_features, token_set
from taps.training.module import DraftModule
from taps.training.objectives import Eagle2Objective, Eagle3Objective, HassObjective, Objective
from taps.training.vocab import frequent_tokens

TRIM_EVERY = 25


def measure(
    target: Target,
    fs: FeatureSet,
    objective: Objective,
    d2t: torch.Tensor | None,
    steps: int,
    bf16: bool,
    online: OnlineFeatures | None = None,
) -> tuple[float, float]:
    torch.manual_seed(0)
    kind = "eagle3" if isinstance(objective, Eagle3Objective) else "eagle2"
    aux = default_aux_layers(target.model.config.num_hidden_layers) if kind == "eagle3" else None
    head = build_head(kind, target.model, kind == "eagle2", aux, d2t).float().train()
    module = DraftModule(head, objective, lr=1e-3, noise=0.1 if kind == "eagle2" else 0.0)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loader = FeatureDataModule(fs, None, 4, 0, online).train_dataloader()
    it = iter(loader)
    tokens, t0 = 0, None
    with PeakMemory("cpu") as mem:  # peak_mb: the whole process; extra_mb: above the start
        for i in range(steps + 3):  # three warm-up steps
            if i == 3:
                tokens, t0 = 0, time.perf_counter()
            batch = next(it)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = module._step(batch, train=True)
            loss.backward()
            opt.step()
            opt.zero_grad()
            tokens += batch["tokens"].numel()
            if i % TRIM_EVERY == 0:  # training itself trims only once, after fitting
                release_memory()
    return tokens / (time.perf_counter() - t0), mem.peak_mb


def _features(
    target: Target, cfg, aux: tuple[int, ...], examples: int | None
) -> tuple[FeatureSet, FeatureSet]:
    """(cached features, the same data as tokens only for online features); `examples`: the
    first N training examples only (a shorter feature pass)."""
    split = build_mixture(
        select_budget(cfg.data.components, cfg.data.budget), default_data_dir(), 42,
        cfg.data.holdout,
    )  # fmt: skip
    train = split.train[:examples] if examples else split.train
    compute = resolve_dtype(cfg.data.feature_compute_dtype, target.device)
    fs = cached_features(target, train, default_cache_dir(), cfg.data.max_len, "bfloat16",
                         "features/train", compute, aux)  # fmt: skip
    return fs, token_set(target, train, cfg.data.max_len)


def _table(rows: list[tuple]) -> None:
    base = rows[0][3]
    print(
        "| objective | vocabulary | features | tokens/s | vs first row | process peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, vocab, feats, tps, mb in rows:
        print(f"| {name} | {vocab} | {feats} | {tps:.0f} | {tps / base:.2f}x | {mb:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--data", default="mathinstruct")
    ap.add_argument("--ttt", default="1,3,5,7", help="EAGLE-3 training-time-test depths")
    ap.add_argument("--eagle3-only", action="store_true")
    ap.add_argument("--mmap-mb", type=float, help="own mapping for allocations >= this (glibc)")
    ap.add_argument("--no-online", action="store_true")
    ap.add_argument("--examples", type=int, help="first N training examples (default: all)")
    args = ap.parse_args()
    if args.mmap_mb:
        print(f"heap growth limited: {limit_heap_growth(int(args.mmap_mb * 2**20))}")
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", [f"data={args.data}"])
    target = load_smollm2(default_cache_dir())
    aux = default_aux_layers(target.model.config.num_hidden_layers)
    fs, tokens = _features(target, cfg, aux, args.examples)
    disk = Path(fs.features.path).stat().st_size
    bf16 = resolve_precision("auto") == "bf16-mixed"
    print(f"autocast bf16: {bf16}; threads {torch.get_num_threads()}")
    print(f"features with layers {aux}: {fs.tokens} tokens, cached at {fs.meta['tokens_per_s']} "
          f"tok/s, {disk / 2**30:.2f} GiB on disk ({disk / fs.tokens / 1024:.1f} KiB a token)")  # fmt: skip
    d2t, cov = frequent_tokens(fs, args.vocab, target.model.lm_head.weight.shape[0], target.eos_ids)
    print(f"draft vocabulary {args.vocab}: covers {100 * cov:.2f}% of response tokens")
    rows = []
    if not args.eagle3_only:
        f2 = _features(target, cfg, (), args.examples)[0]
        for name, objective in [("eagle2", Eagle2Objective()), ("hass", HassObjective())]:
            for vocab, m in [("full", None), (str(args.vocab), d2t)]:
                rows.append(
                    (name, vocab, "cached", *measure(target, f2, objective, m, args.steps, bf16))
                )
    compute = resolve_dtype(cfg.data.feature_compute_dtype, target.device)
    online = OnlineFeatures(target, aux, "bfloat16", compute)
    per_step = replace(fs, target_argmax=None)  # the baseline: argmax(W f) every step
    for steps in [int(x) for x in args.ttt.split(",")]:
        modes = [("cached", fs, None), ("cached, argmax per step", per_step, None),
                 ("online", tokens, online)][: 2 if args.no_online else 3]  # fmt: skip
        for feats, source, mode in modes:
            tps, mb = measure(target, source, Eagle3Objective(steps), d2t, args.steps, bf16, mode)
            rows.append((f"eagle3 (TTT {steps})", str(args.vocab), feats, tps, mb))
    _table(rows)


if __name__ == "__main__":
    main()
