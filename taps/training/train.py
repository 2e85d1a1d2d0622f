"""Train a drafter unless one trained on exactly the same inputs is cached.

The drafter's cache key covers everything that affects its weights: the target's weights, the
exact training and validation conversations, template length, feature dtype, the objective and
its hyper-parameters, the trainer settings, the seed and the head's code version.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from taps.data.conversations import DataError
from taps.data.mixture import build_mixture
from taps.models.draft_head import HEAD_VERSION, DraftHead, load_head, save_head
from taps.models.target import Target
from taps.paths import atomic_dir, content_key
from taps.training.datamodule import FeatureDataModule
from taps.training.features import FEATURES_VERSION, cached_features, features_key
from taps.training.hass import HassConfig
from taps.training.losses import LossWeights
from taps.training.module import DraftModule

log = logging.getLogger(__name__)

# Trainer settings that change how training is shown, not what it produces.
_COSMETIC = {"enable_progress_bar", "log_every_n_steps", "enable_model_summary", "logger"}


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def hass_config(drafter: DictConfig) -> HassConfig | None:
    if drafter.objective == "eagle2":
        return None
    if drafter.objective != "hass":
        raise ValueError(f"drafter.objective={drafter.objective!r}: expected 'eagle2' or 'hass'")
    return HassConfig(drafter.hass_steps, drafter.topk, drafter.topk_weight)


def ensure_drafter(
    target: Target,
    drafter: DictConfig,
    data: DictConfig,
    trainer: DictConfig,
    cache_dir: str,
    data_dir: str,
    seed: int = 42,
    lightning_logger: Any = None,
) -> tuple[DraftHead, dict]:
    """Return a trained head for (target, drafter, data, trainer), training it if missing."""
    split = build_mixture(
        _plain(data.components),
        data_dir,
        seed=seed,
        holdout=data.holdout,
        prefer=data.get("prefer", "auto"),
    )
    store = data.get("feature_dtype", "bfloat16")
    compute = data.get("feature_compute_dtype")
    tkey = features_key(target, split.train, data.max_len, store, compute)
    vkey = features_key(target, split.val, data.max_len, store, compute)
    trainer_cfg = {k: v for k, v in _plain(trainer).items() if k not in _COSMETIC}
    key = content_key(
        HEAD_VERSION, FEATURES_VERSION, tkey, vkey, _plain(drafter), trainer_cfg, seed
    )
    out = Path(cache_dir) / "drafters" / f"{drafter.name}-{data.name}-{key}"
    if (out / "head.safetensors").is_file():
        log.info("drafter cache hit: %s", out)
        return load_head(out, target.model)

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
    L.seed_everything(seed, workers=True)
    head = DraftHead.for_target(target.model, bias=drafter.bias).train()
    module = DraftModule(
        head,
        lr=drafter.lr,
        betas=tuple(drafter.betas),
        weight_decay=drafter.weight_decay,
        warmup_steps=drafter.warmup_steps,
        noise=drafter.noise,
        weights=LossWeights(drafter.feature_weight, drafter.token_weight),
        hass=hass_config(drafter),
    )
    dm = FeatureDataModule(train_fs, val_fs, drafter.batch_size, seed)
    with atomic_dir(out) as tmp:
        loggers = [L.pytorch.loggers.CSVLogger(str(tmp), name="", version="")]
        if lightning_logger is not None:
            loggers.append(lightning_logger)
        # tqdm rather than Lightning's default Rich bar, which prints nothing outside a TTY.
        bar = L.pytorch.callbacks.TQDMProgressBar(refresh_rate=10)
        pl_trainer = instantiate(
            trainer, logger=loggers, callbacks=[bar], default_root_dir=str(tmp)
        )
        t0 = time.perf_counter()
        pl_trainer.fit(module, datamodule=dm)
        secs = time.perf_counter() - t0
        epochs = pl_trainer.current_epoch
        meta = {
            "target": {"name": target.name, "key": target.key},
            "data": {
                **split.info,
                "train_features": train_fs.meta,
                "val_features": val_fs.meta if val_fs else None,
            },
            "drafter": _plain(drafter),
            "trainer": trainer_cfg,
            "seed": seed,
            "key": key,
            "train_seconds": round(secs, 1),
            "train_tokens_per_s": round(train_fs.tokens * epochs / max(secs, 1e-9), 1),
            "final_metrics": {k: float(v) for k, v in pl_trainer.callback_metrics.items()},
        }
        head.eval()
        save_head(head, tmp, meta)
        for junk in ("checkpoints", "hparams.yaml"):
            p = tmp / junk
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    log.info("trained %s in %.0f s: %s", out.name, secs, json.dumps(meta["final_metrics"]))
    return load_head(out, target.model)
