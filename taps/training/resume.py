"""Interrupt-safe training: resumable shuffling, an atomically written last checkpoint, and
the metrics of every training segment joined into one metrics.csv.

Lightning saves the state of a stateful dataloader in its checkpoints and hands it back before
iterating on resume. Our sampler's permutation depends only on (seed, epoch), and its state
is the number of batches already *trained* in the epoch (set by the checkpoint callback, since
Lightning prefetches a batch ahead), so a resumed run skips exactly those and loses none.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler


class EpochPermutation(Sampler[int]):
    """Example order fixed by (seed, epoch). Lightning calls `set_epoch` at every epoch start
    on a batch sampler's `.sampler`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of an EpochPermutation that can start mid-epoch after a resume."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.sampler = EpochPermutation(n, seed)
        self.batch_size = batch_size
        self.trained = 0  # batches of the current epoch already trained (set by LastCheckpoint)
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip after a resume
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Under DDP each rank takes every world-th batch of the same permutation (the same
        count on every rank: the last few batches of an epoch are dropped)."""
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size) // self.world

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.world > 1:
            batches = batches[: len(batches) // self.world * self.world][self.rank :: self.world]
        skip = self._skip[1] if self._skip and self._skip[0] == self.sampler.epoch else 0
        yield from batches[skip:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "trained": self.trained}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.trained = state["trained"]
        self._skip = (state["epoch"], state["trained"])


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning checkpoints (it calls these two methods)."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class LastCheckpoint(L.Callback):
    """Write `path` every `every` optimizer steps and at each epoch end, atomically (a kill
    while writing leaves the previous checkpoint intact)."""

    def __init__(self, path: str | Path, every: int, sampler: EpochBatchSampler) -> None:
        self.path, self.every, self.sampler = Path(path), max(int(every), 1), sampler

    def _save(self, trainer: L.Trainer) -> None:
        for lg in trainer.loggers:  # metrics up to the checkpoint survive a kill (resume joins)
            lg.save()
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp)  # every rank calls it; under DDP only rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.sampler.trained = batch_idx + 1
        if trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.sampler.trained = len(self.sampler)
        self._save(trainer)


def keep_segment(work: Path) -> None:
    """A resumed fit's CSV logger starts metrics.csv afresh: keep the interrupted segment's."""
    if (work / "metrics.csv").is_file():
        n = len(list(work.glob("metrics-segment-*.csv")))
        (work / "metrics.csv").rename(work / f"metrics-segment-{n:03d}.csv")


def join_segments(work: Path, out: Path) -> None:
    """metrics.csv of every training segment, in order, under the union of their columns; a
    segment's rows past the step the next one resumed from were redone by it and are dropped."""
    parts = [*sorted(work.glob("metrics-segment-*.csv")), work / "metrics.csv"]
    segments = []
    for part in (p for p in parts if p.is_file()):
        with open(part, newline="") as f:
            segments.append(list(csv.DictReader(f)))
    rows: list[dict] = []
    for k, seg in enumerate(segments):
        later = [_step(r) for s in segments[k + 1 :] for r in s if _step(r) is not None]
        rows += [r for r in seg if not later or (_step(r) or 0) < min(later)]
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None
