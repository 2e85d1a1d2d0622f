"""Training throughput of a draft head on cached SmolLM2 features, per objective and vocabulary.

    python experiments/train_throughput.py [--steps 40] [--vocab 8192]

Runs EAGLE-2 and HASS steps (AdamW, batch 4 of the real data; bf16 autocast where bf16 is
native, as trainer.precision=auto does) in one process and prints tokens/s, the ratio to EAGLE-2
with the full vocabulary, and the peak memory of each (process RSS above the level before). Features come from the
cache (computed once for data=mathinstruct if missing; the feature pass's own tokens/s is read
from its metadata).
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from taps.config import CONF_DIR, register_resolvers
from taps.data.mixture import build_mixture, select_budget
from taps.memory import PeakMemory
from taps.models.draft_head import DraftHead
from taps.models.precision import resolve_dtype, resolve_precision
from taps.models.target import Target, load_smollm2
from taps.paths import default_cache_dir, default_data_dir
from taps.training.datamodule import FeatureDataModule
from taps.training.features import FeatureSet, cached_features
from taps.training.module import DraftModule
from taps.training.objectives import Eagle2Objective, HassObjective, Objective
from taps.training.vocab import frequent_tokens


def measure(
    target: Target,
    fs: FeatureSet,
    objective: Objective,
    d2t: torch.Tensor | None,
    steps: int,
    bf16: bool,
) -> tuple[float, float]:
    torch.manual_seed(0)
    head = DraftHead.for_target(target.model, d2t=d2t).train()
    module = DraftModule(head, objective, lr=1e-3)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loader = FeatureDataModule(fs, None, 4, 0).train_dataloader()
    it = iter(loader)
    tokens, t0 = 0, None
    with PeakMemory("cpu") as mem:
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
    return tokens / (time.perf_counter() - t0), mem.extra_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--data", default="mathinstruct")
    args = ap.parse_args()
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", [f"data={args.data}"])
    torch.set_num_threads(torch.get_num_threads())
    target = load_smollm2(default_cache_dir())
    split = build_mixture(
        select_budget(cfg.data.components, cfg.data.budget), default_data_dir(), 42,
        cfg.data.holdout,
    )  # fmt: skip
    fs = cached_features(
        target, split.train, default_cache_dir(), cfg.data.max_len, "bfloat16",
        "features/train", resolve_dtype(cfg.data.feature_compute_dtype, target.device),
    )  # fmt: skip
    bf16 = resolve_precision("auto") == "bf16-mixed"
    print(f"autocast bf16: {bf16}; threads {torch.get_num_threads()}")
    print(f"features: {fs.tokens} tokens, cached at {fs.meta['tokens_per_s']} tok/s")
    d2t, cov = frequent_tokens(fs, args.vocab, target.model.lm_head.weight.shape[0], target.eos_ids)
    print(f"draft vocabulary {args.vocab}: covers {100 * cov:.2f}% of response tokens")
    rows = []
    for name, objective in [("eagle2", Eagle2Objective()), ("hass", HassObjective())]:
        for vocab, m in [("full", None), (str(args.vocab), d2t)]:
            rows.append((name, vocab, *measure(target, fs, objective, m, args.steps, bf16)))
    base = rows[0][2]
    print("| objective | vocabulary | tokens/s | vs EAGLE-2 full | peak memory (MiB over start) |")
    print("|---|---|---|---|---|")
    for name, vocab, tps, mb in rows:
        print(f"| {name} | {vocab} | {tps:.0f} | {tps / base:.2f}x | {mb:.0f} |")


if __name__ == "__main__":
    main()
