"""Training stops at the first non-finite loss: a drafter trained on NaN features (or diverged)
must fail loudly, never be cached and served as if it had trained."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class FiniteLoss(L.Callback):
    """Raise FloatingPointError at the first non-finite training loss, naming the step."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"training loss is {float(loss)} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {batch_idx}): the drafter is not cached. "
                "Non-finite target features or a too large drafter.lr are the usual causes."
            )


def check_finite_weights(module: torch.nn.Module, what: str) -> None:
    """Refuse to publish weights with a NaN or infinity (names the first such parameter)."""
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"{what}: parameter {name} is non-finite; not cached")
