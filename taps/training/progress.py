"""A tqdm progress bar that also shows training throughput in tokens per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class TokensPerSecondBar(TQDMProgressBar):
    """tqdm rather than Lightning's default Rich bar, which prints nothing outside a TTY."""

    def __init__(self, refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._tokens = 0
        self._t0: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, module)
        self._tokens, self._t0 = 0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._tokens += int(batch["tokens"].numel())  # padded positions are computed too
        super().on_train_batch_end(trainer, module, outputs, batch, idx)

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        if self._t0 is not None and self._tokens:
            metrics["tok/s"] = f"{self._tokens / (time.perf_counter() - self._t0):.0f}"
        return metrics
