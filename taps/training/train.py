"""Train a drafter unless one trained on exactly the same inputs is cached.

The drafter's cache key covers everything that affects its weights: the target's weights, the
exact training and validation conversations, template length, feature dtype, the objective and
its hyper-parameters, the trainer settings, the seed and the head's code version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from taps.data.conversations import DataError
from taps.data.mixture import build_mixture, select_budget
from taps.memory import PeakMemory
from taps.models.draft_head import HEAD_VERSION, DraftHead, load_head, save_head
from taps.models.precision import resolve_dtype, resolve_precision
from taps.models.target import Target
from taps.paths import atomic_dir, content_key, file_lock
from taps.training.datamodule import FeatureDataModule
from taps.training.features import FEATURES_VERSION, cached_features, features_key
from taps.training.hass import HassConfig
from taps.training.losses import LossWeights
from taps.training.module import DraftModule
from taps.training.progress import TokensPerSecondBar
from taps.training.regenerate import cached_regeneration
from taps.training.resume import LastCheckpoint
from taps.training.vocab import frequent_tokens

log = logging.getLogger(__name__)

# Trainer settings that change how training is shown, not what it produces.
_COSMETIC = {
    "enable_progress_bar",
    "log_every_n_steps",
    "enable_model_summary",
    "logger",
    "checkpoint_every",
    "val_check_interval",  # validation draws no random numbers: it cannot change the weights
    "check_val_every_n_epoch",
}
# Drafter settings that change what is measured during training, not the weights.
_DRAFTER_COSMETIC = {"val_depth"}
# Config key -> cache entry: a sweep resolves each drafter (data selection, hashing) once per
# process; the cache entry itself is still checked on every call.
_RESOLVED: dict[str, Path] = {}


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _resolved_trainer(trainer: DictConfig) -> DictConfig:
    """trainer.precision=auto becomes the precision that is fast here (it is in the key)."""
    t = OmegaConf.create(_plain(trainer))
    t.precision = resolve_precision(t.get("precision", "32-true"), t.get("accelerator", "cpu"))
    return t


def hass_config(drafter: DictConfig) -> HassConfig | None:
    if drafter.objective == "eagle2":
        return None
    if drafter.objective != "hass":
        raise ValueError(f"drafter.objective={drafter.objective!r}: expected 'eagle2' or 'hass'")
    return HassConfig(drafter.hass_steps, drafter.topk, drafter.topk_weight)


def _two_stage(drafter: DictConfig) -> tuple[int | None, float]:
    """(stage-2 start epoch or None, its lr scale): the reference HASS schedule, if asked."""
    if not drafter.get("two_stage", False):
        return None, 1.0
    if drafter.objective != "hass":
        raise ValueError("drafter.two_stage applies to objective=hass (it stages distillation)")
    return int(drafter.stage2_epoch), float(drafter.stage2_lr_scale)


def _source_summary(split_info: dict, fs_meta: dict) -> str:
    parts = []
    for src, d in fs_meta.get("by_source", {}).items():
        parts.append(
            f"{src}: {d['examples']} examples, {d['tokens']} tokens, "
            f"{d['supervised_tokens']} supervised ({100 * d['supervised_share']:.1f}%)"
        )
    return "; ".join(parts) or json.dumps(split_info.get("shares"))


def ensure_drafter(
    target: Target,
    drafter: DictConfig,
    data: DictConfig,
    trainer: DictConfig,
    cache_dir: str,
    data_dir: str,
    seed: int = 42,
    lightning_logger: Any = None,
    callbacks: list | None = None,
) -> tuple[DraftHead, dict]:
    """Return a trained head for (target, drafter, data, trainer), training it if missing.
    An interrupted training resumes from its last checkpoint on the next call.
    A drafter with `path` (objective pretrained) is loaded as published, without training."""
    if drafter.get("path"):
        from taps.models.eagle_format import load_pretrained

        return load_pretrained(str(drafter.path), target.model)
    memo = content_key(
        target.key, *map(_plain, (drafter, data, trainer)), cache_dir, data_dir, seed
    )
    hit = _RESOLVED.get(memo)
    if hit is not None and (hit / "head.safetensors").is_file():
        return load_head(hit, target.model)
    split = build_mixture(
        select_budget(_plain(data.components), data.get("budget")),
        data_dir,
        seed=seed,
        holdout=data.holdout,
        prefer=data.get("prefer", "auto"),
    )
    store = data.get("feature_dtype", "bfloat16")
    compute = resolve_dtype(data.get("feature_compute_dtype"), target.device)
    if data.get("regenerate", False):
        regen = {"max_len": data.max_len, "max_new_tokens": data.regenerate_max_tokens,
                 "compute_dtype": compute}  # fmt: skip
        split.train = cached_regeneration(target, split.train, cache_dir, **regen,
                                          desc="regenerate/train")  # fmt: skip
        split.val = cached_regeneration(target, split.val, cache_dir, **regen,
                                        desc="regenerate/val")  # fmt: skip
        split.info["regenerated"] = {**regen, "train": len(split.train), "val": len(split.val)}
    tkey = features_key(target, split.train, data.max_len, store, compute)
    vkey = features_key(target, split.val, data.max_len, store, compute)
    trainer = _resolved_trainer(trainer)
    trainer_cfg = {k: v for k, v in _plain(trainer).items() if k not in _COSMETIC}
    drafter_cfg = {k: v for k, v in _plain(drafter).items() if k not in _DRAFTER_COSMETIC}
    key = content_key(HEAD_VERSION, FEATURES_VERSION, tkey, vkey, drafter_cfg, trainer_cfg, seed)
    out = Path(cache_dir) / "drafters" / f"{drafter.name}-{data.name}-{key}"
    if not (out / "head.safetensors").is_file():
        # One trainer per drafter: a parallel job that needs it waits, then finds it cached.
        args = (target, drafter, data, trainer, split, out, key, cache_dir, seed,
                lightning_logger, callbacks)  # fmt: skip
        if not _launching_rank():  # a DDP worker: rank 0 holds the lock and waits for it
            _train(*args)
        else:
            with file_lock(Path(cache_dir) / "locks" / out.name):
                if not (out / "head.safetensors").is_file():
                    _train(*args)
    else:
        log.info("drafter cache hit: %s", out)
    _RESOLVED[memo] = out
    return load_head(out, target.model)


def _launching_rank() -> bool:
    """False in the extra processes of a distributed run (Lightning's DDP launcher, torchrun,
    SLURM tasks), which must not wait on the lock that rank 0 holds while it waits for them."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _train(
    target: Target,
    drafter: DictConfig,
    data: DictConfig,
    trainer: DictConfig,
    split: Any,
    out: Path,
    key: str,
    cache_dir: str,
    seed: int,
    lightning_logger: Any,
    callbacks: list | None,
) -> None:
    """Train the drafter and publish it at `out` (atomically)."""
    store = data.get("feature_dtype", "bfloat16")
    compute = resolve_dtype(data.get("feature_compute_dtype"), target.device)
    trainer_cfg = {k: v for k, v in _plain(trainer).items() if k not in _COSMETIC}
    train_fs = cached_features(
        target, split.train, cache_dir, data.max_len, store, "features/train", compute
    )
    try:
        val_fs = cached_features(
            target, split.val, cache_dir, data.max_len, store, "features/val", compute
        )
    except DataError as e:  # e.g. every held-out example truncated before its answer
        log.warning("no validation set (%s): training without held-out metrics", e)
        val_fs = None
    log.info("training data: %s", _source_summary(split.info, train_fs.meta))
    d2t, coverage = None, 1.0
    vocab = target.model.lm_head.weight.shape[0]
    if drafter.get("draft_vocab") and drafter.draft_vocab < vocab:  # else: the full one
        d2t, coverage = frequent_tokens(train_fs, int(drafter.draft_vocab), vocab, target.eos_ids)
        log.info("draft vocabulary: %d tokens cover %.2f%% of responses", len(d2t), 100 * coverage)
    L.seed_everything(seed, workers=True)
    # float32 master weights whatever the target's dtype; autocast handles the compute.
    head = DraftHead.for_target(target.model, bias=drafter.bias, d2t=d2t).float().train()
    stage2_epoch, stage2_lr_scale = _two_stage(drafter)
    dm = FeatureDataModule(train_fs, val_fs, drafter.batch_size, seed)
    module = DraftModule(
        head,
        lr=drafter.lr,
        betas=tuple(drafter.betas),
        weight_decay=drafter.weight_decay,
        warmup_steps=drafter.warmup_steps,
        noise=drafter.noise,
        weights=LossWeights(drafter.feature_weight, drafter.token_weight),
        hass=hass_config(drafter),
        val_depth=int(drafter.get("val_depth", 5)),
        stage2_epoch=stage2_epoch,
        stage2_lr_scale=stage2_lr_scale,
        steps_per_epoch=len(dm.sampler),
    )
    # Work in progress lives beside the cache entry, so an interrupted run resumes from its
    # last checkpoint; the entry itself appears only when training has finished.
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "last.ckpt"
    resume = str(ckpt) if ckpt.is_file() else None
    if resume:
        log.info("resuming %s from %s", out.name, ckpt)
    loggers = [L.pytorch.loggers.CSVLogger(str(work), name="", version="")]
    if callable(lightning_logger):  # a factory: the run's logger starts only if we train
        lightning_logger = lightning_logger()
    if lightning_logger is not None:
        loggers.append(lightning_logger)
    callbacks = [
        TokensPerSecondBar(refresh_rate=10),
        LastCheckpoint(ckpt, int(trainer.get("checkpoint_every", 200)), dm.sampler),
        *(callbacks or []),
    ]
    kwargs = {k: v for k, v in _plain(trainer).items() if k != "checkpoint_every"}
    pl_trainer = instantiate(
        kwargs, logger=loggers, callbacks=callbacks, default_root_dir=str(work)
    )
    for lg in loggers:
        lg.log_hyperparams({"data": split.info, "by_source": train_fs.meta.get("by_source")})
    t0 = time.perf_counter()
    with PeakMemory(target.device) as mem:
        pl_trainer.fit(module, datamodule=dm, ckpt_path=resume)
    secs = time.perf_counter() - t0
    if not pl_trainer.is_global_zero:
        # DDP re-runs this command once per extra rank: those ranks only help fit; rank 0
        # publishes the drafter and evaluates.
        raise SystemExit(0)
    epochs = pl_trainer.current_epoch
    with atomic_dir(out) as tmp:
        meta = {
            "target": {"name": target.name, "key": target.key},
            "data": {
                **split.info,
                "train_features": train_fs.meta,
                "val_features": val_fs.meta if val_fs else None,
            },
            "drafter": _plain(drafter),
            "draft_vocab_coverage": coverage,
            "trainer": trainer_cfg,
            "seed": seed,
            "key": key,
            "resumed": resume is not None,
            "global_step": pl_trainer.global_step,
            # Seconds of this process; a resumed run's earlier part is not included.
            "train_seconds": round(secs, 1),
            "train_tokens_per_s": None
            if resume
            else round(train_fs.tokens * epochs / max(secs, 1e-9), 1),
            "final_metrics": {k: float(v) for k, v in pl_trainer.callback_metrics.items()},
            # Process RSS (CPU) or torch-allocated memory (GPU) while fitting.
            "peak_memory": mem.as_dict(),
        }
        head.eval()
        save_head(head, tmp, meta)
        if (work / "metrics.csv").is_file():
            shutil.copy(work / "metrics.csv", tmp / "metrics.csv")
    shutil.rmtree(work, ignore_errors=True)
    log.info("trained %s in %.0f s: %s", out.name, secs, json.dumps(meta["final_metrics"]))
