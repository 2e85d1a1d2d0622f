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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from taps.data.conversations import DataError
from taps.data.mixture import build_mixture, select_budget
from taps.memory import PeakMemory, release_memory
from taps.models.eagle3_head import default_aux_layers
from taps.models.heads import VERSIONS, AnyHead, build_head, check_kind, load_head, save_head
from taps.models.precision import resolve_dtype, resolve_precision
from taps.models.target import Target
from taps.paths import atomic_dir, content_key, file_lock, verify_entry
from taps.training.datamodule import FeatureDataModule
from taps.training.features import (
    FEATURES_VERSION,
    FeatureSet,
    OnlineFeatures,
    cached_features,
    features_key,
    token_set,
)
from taps.training.guards import FiniteLoss, check_finite_weights
from taps.training.module import DraftModule
from taps.training.objectives import Objective
from taps.training.regenerate import cached_regeneration
from taps.training.resume import LastCheckpoint, join_segments, keep_segment
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
# Bump when training's numerics change without a setting changing (batch shapes, losses): it
# is part of every drafter's key. v2: sequence lengths and supervised rows padded to buckets.
TRAINING_VERSION = "training-v2"
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


def _weight_settings(trainer: DictConfig) -> dict:
    """The trainer settings that can change the weights (in the key and the metadata)."""
    return {k: v for k, v in _plain(trainer).items() if k not in _COSMETIC}


def aux_layer_ids(drafter: DictConfig, n_layers: int) -> tuple[int, ...]:
    """drafter.aux_layers, or the reference's (2, L/2, L-3) when it is null."""
    ids = drafter.get("aux_layers")
    return default_aux_layers(n_layers) if ids is None else tuple(int(i) for i in ids)


def features_mode(data: DictConfig, split: Any, hidden: int, aux: tuple[int, ...]) -> str:
    """data.features, with `auto` resolved by size: cached unless the features could exceed
    data.features_disk_gb (bound: every example at max_len, final plus auxiliary layers in
    the stored dtype), then online (a 70k-example, 8B-target mixture would need terabytes)."""
    mode = str(data.get("features", "cached"))
    if mode not in ("cached", "online", "auto"):
        raise ValueError(f"data.features={mode!r}: expected cached, online or auto")
    if mode != "auto":
        return mode
    examples = len(split.train) + len(split.val)
    width = hidden * (1 + len(aux)) * (4 if data.get("feature_dtype") == "float32" else 2)
    bound_gb = examples * int(data.max_len) * width / 2**30
    return "cached" if bound_gb <= float(data.get("features_disk_gb", 64)) else "online"


def build_objective(drafter: DictConfig) -> Objective:
    """The drafter's training objective, instantiated from `drafter.objective` (`_target_`);
    a misspelt option fails here, with Hydra's error naming the key."""
    if drafter.get("objective") is None:
        raise ValueError(
            f"drafter={drafter.get('name')}: drafter.objective is null, so this drafter cannot "
            "be trained (a pretrained head needs drafter.path)"
        )
    return instantiate(drafter.objective)


def build_callbacks(cfg_callbacks: DictConfig | dict | None) -> list[L.Callback]:
    """Lightning callbacks of the `callbacks` config group: a mapping of named `_target_`
    nodes (a null node is skipped: `callbacks.progress=null`). None or {}: no callbacks."""
    out = []
    for name, node in (cfg_callbacks or {}).items():
        if node is None:
            continue
        if not (isinstance(node, dict) or OmegaConf.is_dict(node)) or "_target_" not in node:
            raise ValueError(f"callbacks.{name}: expected a node with a _target_, got {node!r}")
        out.append(instantiate(node))
    return out


def _two_stage(drafter: DictConfig, objective: Objective) -> tuple[int | None, float]:
    """(stage-2 start epoch or None, its lr scale): the reference HASS schedule, if asked."""
    if not drafter.get("two_stage", False):
        return None, 1.0
    objective.first_stage()  # an objective without stages raises, naming drafter.two_stage
    return int(drafter.stage2_epoch), float(drafter.stage2_lr_scale)


@dataclass(frozen=True)
class _Job:
    """A drafter to train, resolved by ensure_drafter: its data, objective and cache entry."""

    target: Target
    drafter: DictConfig
    data: DictConfig
    trainer: DictConfig  # with trainer.precision resolved
    objective: Objective
    stage2: tuple[int | None, float]  # (stage-2 start epoch or None, its lr scale)
    split: Any  # the data mixture's train/val conversations and info
    store: str  # feature dtype on disk
    compute: str | None  # dtype of the target forward that computes features
    key: str
    out: Path  # the cache entry
    cache_dir: str
    seed: int
    features: str = "cached"  # data.features resolved: cached or online

    @property
    def online(self) -> bool:
        """data.features=online: batches run the frozen target instead of a cached pass."""
        return self.features == "online"

    @property
    def kind(self) -> str:
        return str(self.drafter.get("kind", "eagle2"))

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """The target layers an EAGLE-3 head fuses (resolved: the reference's defaults when
        drafter.aux_layers is null); none for EAGLE-1/2 heads."""
        if self.kind != "eagle3":
            return ()
        return aux_layer_ids(self.drafter, self.target.model.config.num_hidden_layers)

    @property
    def work(self) -> Path:
        """Work in progress (checkpoint, metrics) beside the cache entry."""
        return self.out.with_name(self.out.name + ".partial")


@dataclass
class _Fit:
    """What a finished `Trainer.fit` leaves for the drafter's metadata."""

    trainer: L.Trainer
    seconds: float
    memory: PeakMemory
    resumed: bool


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
) -> tuple[AnyHead, dict]:
    """Return a trained head for (target, drafter, data, trainer), training it if missing.
    An interrupted training resumes from its last checkpoint on the next call.
    A drafter with `path` (drafter=eagle_pretrained) is loaded as published, without training.
    `callbacks` (e.g. `build_callbacks(cfg.callbacks)`) join the trainer's resume checkpoint."""
    if drafter.get("path"):
        from taps.models.serving import load_pretrained

        return load_pretrained(str(drafter.path), target.model)
    memo = content_key(
        target.key, *map(_plain, (drafter, data, trainer)), cache_dir, data_dir, seed
    )
    hit = _RESOLVED.get(memo)
    if hit is not None and (hit / "head.safetensors").is_file():
        return _load_cached(hit, target)
    job = _resolve(target, drafter, data, trainer, cache_dir, data_dir, seed)
    if not (job.out / "head.safetensors").is_file():
        _train_once(job, lightning_logger, list(callbacks or []))
    else:
        log.info("drafter cache hit: %s", job.out)
    _RESOLVED[memo] = job.out
    return _load_cached(job.out, target)


def _load_cached(out: Path, target: Target) -> tuple[AnyHead, dict]:
    """A cached drafter, every file checked against the manifest it was built with; the head
    file's digest joins its metadata, so the cells it decodes are tied to these bytes."""
    digests = verify_entry(out, "the cached drafter")
    head, meta = load_head(out, target.model)
    return head, {**meta, "weights_sha256": digests["head.safetensors"]}


def _resolve(
    target: Target,
    drafter: DictConfig,
    data: DictConfig,
    trainer: DictConfig,
    cache_dir: str,
    data_dir: str,
    seed: int,
) -> _Job:
    """Select (and regenerate) the data and compute the drafter's cache key and entry."""
    check_kind(str(drafter.get("kind", "eagle2")))
    objective = build_objective(drafter)  # a bad objective fails before any data is read
    stage2 = _two_stage(drafter, objective)
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
        _regenerate(target, data, split, cache_dir, compute)
    aux = aux_layer_ids(drafter, target.model.config.num_hidden_layers)
    aux = aux if drafter.get("kind", "eagle2") == "eagle3" else ()
    tkey = features_key(target, split.train, data.max_len, store, compute, aux)
    vkey = features_key(target, split.val, data.max_len, store, compute, aux)
    trainer = _resolved_trainer(trainer)
    trainer_cfg = _weight_settings(trainer)
    drafter_cfg = {k: v for k, v in _plain(drafter).items() if k not in _DRAFTER_COSMETIC}
    version = VERSIONS[str(drafter.get("kind", "eagle2"))]
    # Online features round like cached ones, but the matmuls see other batch shapes.
    mode = features_mode(data, split, target.model.config.hidden_size, aux)
    online = ["features", "online"] if mode == "online" else []
    key = content_key(version, TRAINING_VERSION, FEATURES_VERSION, tkey, vkey, drafter_cfg,
                      trainer_cfg, seed, *online)  # fmt: skip
    out = Path(cache_dir) / "drafters" / f"{drafter.name}-{data.name}-{key}"
    return _Job(target, drafter, data, trainer, objective, stage2, split, store, compute, key,
                out, cache_dir, seed, mode)  # fmt: skip


def _regenerate(
    target: Target, data: DictConfig, split: Any, cache_dir: str, compute: str | None
) -> None:
    """Replace the split's responses by the target's own (data.regenerate), in place."""
    regen = {"max_len": data.max_len, "max_new_tokens": data.regenerate_max_tokens,
             "compute_dtype": compute}  # fmt: skip
    split.train = cached_regeneration(target, split.train, cache_dir, **regen,
                                      desc="regenerate/train")  # fmt: skip
    split.val = cached_regeneration(target, split.val, cache_dir, **regen,
                                    desc="regenerate/val")  # fmt: skip
    split.info["regenerated"] = {**regen, "train": len(split.train), "val": len(split.val)}


def _launching_rank() -> bool:
    """False in the extra processes of a distributed run (Lightning's DDP launcher, torchrun,
    SLURM tasks), which must not wait on the lock that rank 0 holds while it waits for them."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _train_once(job: _Job, lightning_logger: Any, callbacks: list) -> None:
    """One trainer per drafter: a parallel job that needs it waits, then finds it cached."""
    if not _launching_rank():  # a DDP worker: rank 0 holds the lock and waits for it
        _train(job, lightning_logger, callbacks)
        return
    with file_lock(Path(job.cache_dir) / "locks" / job.out.name, f"drafter {job.out.name}"):
        if not (job.out / "head.safetensors").is_file():
            _train(job, lightning_logger, callbacks)


def _train(job: _Job, lightning_logger: Any, callbacks: list) -> None:
    """Train the drafter and publish it at `job.out` (atomically)."""
    train_fs, val_fs = _features(job)
    log.info("training data: %s", _source_summary(job.split.info, train_fs.meta))
    d2t, coverage = _draft_vocab(job, train_fs)
    L.seed_everything(job.seed, workers=True)
    # float32 master weights whatever the target's dtype; autocast handles the compute.
    head = _new_head(job, d2t)
    online = (
        OnlineFeatures(job.target, job.aux_layers, job.store, job.compute) if job.online else None
    )
    dm = FeatureDataModule(train_fs, val_fs, job.drafter.batch_size, job.seed, online)
    fit = _fit(job, _module(job, head, len(dm.sampler)), dm, train_fs, lightning_logger,
               callbacks)  # fmt: skip
    if not fit.trainer.is_global_zero:
        # DDP re-runs this command once per extra rank: those ranks only help fit; rank 0
        # publishes the drafter and evaluates.
        raise SystemExit(0)
    _publish(job, head, fit, train_fs, val_fs, coverage)
    del fit, dm
    release_memory()  # training's freed heap goes back to the system before decoding


def _new_head(job: _Job, d2t: Tensor | None) -> AnyHead:
    """The untrained head, in float32 master weights whatever the target's dtype."""
    head = build_head(job.kind, job.target.model, bool(job.drafter.get("bias", False)),
                      job.aux_layers or None, d2t).float()  # fmt: skip
    if job.kind == "eagle3" and job.drafter.get("init_head", "target") == "random":
        head.reset_lm_head(job.seed)
    return head.train()


def _features(job: _Job) -> tuple[FeatureSet, FeatureSet | None]:
    """Training and validation features (cached, or tokens only with data.features=online);
    no validation set if none is usable."""
    target, split, max_len = job.target, job.split, job.data.max_len
    aux = job.aux_layers

    def load(convs: list, desc: str) -> FeatureSet:
        if job.online:
            return token_set(target, convs, max_len)
        return cached_features(target, convs, job.cache_dir, max_len, job.store, desc,
                               job.compute, aux)  # fmt: skip

    train_fs = load(split.train, "features/train")
    try:
        val_fs = load(split.val, "features/val")
    except DataError as e:  # e.g. every held-out example truncated before its answer
        log.warning("no validation set (%s): training without held-out metrics", e)
        val_fs = None
    return train_fs, val_fs


def _draft_vocab(job: _Job, train_fs: FeatureSet) -> tuple[Tensor | None, float]:
    """(d2t, share of response tokens it covers): the drafter.draft_vocab most frequent tokens,
    or (None, 1.0) for the full vocabulary."""
    drafter, target = job.drafter, job.target
    vocab = target.model.lm_head.weight.shape[0]
    if not (drafter.get("draft_vocab") and drafter.draft_vocab < vocab):
        return None, 1.0
    d2t, coverage = frequent_tokens(train_fs, int(drafter.draft_vocab), vocab, target.eos_ids)
    log.info("draft vocabulary: %d tokens cover %.2f%% of responses", len(d2t), 100 * coverage)
    return d2t, coverage


def _module(job: _Job, head: AnyHead, steps_per_epoch: int) -> DraftModule:
    drafter = job.drafter
    stage2_epoch, stage2_lr_scale = job.stage2
    return DraftModule(
        head,
        job.objective,
        lr=drafter.lr,
        betas=tuple(drafter.betas),
        weight_decay=drafter.weight_decay,
        warmup_steps=drafter.warmup_steps,
        noise=drafter.noise,
        val_depth=int(drafter.get("val_depth", 5)),
        stage2_epoch=stage2_epoch,
        stage2_lr_scale=stage2_lr_scale,
        steps_per_epoch=steps_per_epoch,
    )


def _fit(
    job: _Job,
    module: DraftModule,
    dm: FeatureDataModule,
    train_fs: FeatureSet,
    lightning_logger: Any,
    callbacks: list,
) -> _Fit:
    """Fit in job.work, resuming from its last checkpoint if there is one."""
    # Work in progress lives beside the cache entry, so an interrupted run resumes from its
    # last checkpoint; the entry itself appears only when training has finished.
    job.work.mkdir(parents=True, exist_ok=True)
    ckpt = job.work / "last.ckpt"
    resume = str(ckpt) if ckpt.is_file() else None
    if resume:
        log.info("resuming %s from %s", job.out.name, ckpt)
        keep_segment(job.work)
    loggers = [L.pytorch.loggers.CSVLogger(str(job.work), name="", version="")]
    if callable(lightning_logger):  # a factory: the run's logger starts only if we train
        lightning_logger = lightning_logger()
    if lightning_logger is not None:
        loggers.append(lightning_logger)
    # The resume checkpoint needs run-time arguments, so it is added here, not configured.
    every = int(job.trainer.get("checkpoint_every", 200))
    # FiniteLoss first: a NaN step raises before any checkpoint of its weights is written.
    callbacks = [FiniteLoss(), LastCheckpoint(ckpt, every, dm.sampler), *callbacks]
    kwargs = {k: v for k, v in _plain(job.trainer).items() if k != "checkpoint_every"}
    pl_trainer = instantiate(
        kwargs, logger=loggers, callbacks=callbacks, default_root_dir=str(job.work)
    )
    for lg in loggers:
        lg.log_hyperparams({"data": job.split.info, "by_source": train_fs.meta.get("by_source")})
    t0 = time.perf_counter()
    with PeakMemory(job.target.device) as mem:
        pl_trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return _Fit(pl_trainer, time.perf_counter() - t0, mem, resume is not None)


def _publish(
    job: _Job,
    head: AnyHead,
    fit: _Fit,
    train_fs: FeatureSet,
    val_fs: FeatureSet | None,
    coverage: float,
) -> None:
    """Write the cache entry (head + metadata + metrics.csv) atomically; drop the work dir."""
    check_finite_weights(head, f"drafter {job.out.name}")
    with atomic_dir(job.out) as tmp:
        meta = _meta(job, fit, train_fs, val_fs, coverage)
        head.eval()
        save_head(head, tmp, meta)
        join_segments(job.work, tmp / "metrics.csv")
    shutil.rmtree(job.work, ignore_errors=True)
    log.info("trained %s in %.0f s: %s", job.out.name, fit.seconds,
             json.dumps(meta["final_metrics"]))  # fmt: skip


def _meta(
    job: _Job, fit: _Fit, train_fs: FeatureSet, val_fs: FeatureSet | None, coverage: float
) -> dict:
    target, pl_trainer, secs = job.target, fit.trainer, fit.seconds
    epochs = pl_trainer.current_epoch
    return {
        "target": {"name": target.name, "key": target.key},
        "data": {
            **job.split.info,
            "train_features": train_fs.meta,
            "val_features": val_fs.meta if val_fs else None,
        },
        "drafter": _plain(job.drafter),
        "draft_vocab_coverage": coverage,
        "trainer": _weight_settings(job.trainer),
        "seed": job.seed,
        "key": job.key,
        "resumed": fit.resumed,
        "global_step": pl_trainer.global_step,
        # Seconds of this process; a resumed run's earlier part is not included.
        "train_seconds": round(secs, 1),
        "train_tokens_per_s": None
        if fit.resumed
        else round(train_fs.tokens * epochs / max(secs, 1e-9), 1),
        "final_metrics": {k: float(v) for k, v in pl_trainer.callback_metrics.items()},
        # Process RSS (CPU) or torch-allocated memory (GPU) while fitting.
        "peak_memory": fit.memory.as_dict(),
    }
