"""Lightning module training a draft head on cached target features (EAGLE-2 or HASS)."""

from __future__ import annotations

import lightning as L
import torch

from taps.models.draft_head import DraftHead
from taps.training.hass import HassConfig, hass_loss
from taps.training.losses import LossWeights, eagle_loss


class DraftModule(L.LightningModule):
    def __init__(
        self,
        head: DraftHead,
        lr: float = 3e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        noise: float = 0.1,
        weights: LossWeights | None = None,
        hass: HassConfig | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.noise = warmup_steps, noise
        self.weights = weights or LossWeights()
        self.hass = hass  # None: the EAGLE-2 objective

    def _step(
        self, batch: dict[str, torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f_in = batch["f_in"].to(self.head.fc.weight.dtype)
        if train and self.noise > 0:
            # Uniform input noise, not scaled by sequence length (a reference-code mistake).
            f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * self.noise
        if self.hass is not None:
            return hass_loss(self.head, f_in, batch["tokens"], batch["f_next"], batch["mask"],
                             self.weights, self.hass)  # fmt: skip
        g = self.head(f_in, batch["tokens"])
        return eagle_loss(g, batch["f_next"], batch["mask"], self.head.lm_head_weight, self.weights)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss, m = self._step(batch, train=True)
        n = int(batch["mask"].sum())
        self.log_dict({f"train/{k}": v for k, v in m.items()}, prog_bar=False, batch_size=n)
        self.log("loss", m["loss"], prog_bar=True, logger=False, batch_size=n)
        self.log("top1", m["top1"], prog_bar=True, logger=False, batch_size=n)
        self.log("train/tokens", float(batch["tokens"].numel()), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        _, m = self._step(batch, train=False)
        n = int(batch["mask"].sum())
        self.log_dict({f"val/{k}": v for k, v in m.items()}, prog_bar=True, batch_size=n)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(self.warmup_steps, max(total // 10, 1))

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10%
            if step < warm:
                return (step + 1) / warm
            return max(0.1, 1 - 0.9 * (step - warm) / max(total - warm, 1))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
