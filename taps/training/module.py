"""Lightning module training a draft head on cached target features (EAGLE-2 or HASS)."""

from __future__ import annotations

import lightning as L
import torch

from taps.models.draft_head import DraftHead
from taps.training.metrics import rollout_metrics
from taps.training.objectives import Eagle2Objective, Objective


class DraftModule(L.LightningModule):
    def __init__(
        self,
        head: DraftHead,
        objective: Objective | None = None,
        lr: float = 3e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        noise: float = 0.1,
        val_depth: int = 5,
        stage2_epoch: int | None = None,
        stage2_lr_scale: float = 1.0,
        steps_per_epoch: int | None = None,
    ) -> None:
        """objective: the loss (taps.training.objectives); None: EAGLE-2 with default weights.
        stage2_epoch: the reference HASS two-stage schedule; epochs before it train with
        `objective.first_stage()` (no top-K distillation), later ones with the objective at
        lr * stage2_lr_scale. None: one stage.
        steps_per_epoch: given, the schedule does not ask the trainer to set up the data early
        (`estimated_stepping_batches` would, before a resumed run restores the loader)."""
        super().__init__()
        self.head = head
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.noise = warmup_steps, noise
        self.objective = Eagle2Objective() if objective is None else objective
        # Built now, so an objective without stages fails before training starts.
        self.stage1_objective = None if stage2_epoch is None else self.objective.first_stage()
        self.val_depth = val_depth
        self.stage2_epoch, self.stage2_lr_scale = stage2_epoch, stage2_lr_scale
        self.steps_per_epoch = steps_per_epoch

    def _first_stage(self) -> bool:
        return self.stage2_epoch is not None and self.current_epoch < self.stage2_epoch

    def _step(
        self, batch: dict[str, torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f_in = batch["f_in"].to(self.head.fc.weight.dtype)
        if train and self.noise > 0:
            # Uniform input noise, not scaled by sequence length (a reference-code mistake).
            f_in = f_in + (torch.rand_like(f_in) * 2 - 1) * self.noise
        objective = self.stage1_objective if self._first_stage() else self.objective
        return objective(self.head, f_in, batch["tokens"], batch["f_next"], batch["mask"],
                         batch.get("top"))  # fmt: skip

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
        token = m["token_loss"] if "token_loss" in m else m["step1/token_loss"]
        self.log_dict({"val/loss": m["loss"], "val/token_loss": token}, batch_size=n)
        f_in = batch["f_in"].to(self.head.fc.weight.dtype)
        roll = rollout_metrics(self.head, f_in, batch["tokens"], batch["f_next"], batch["mask"],
                               self.val_depth, batch.get("top"))  # fmt: skip
        bar = {"val/top1_d1", "val/sim_tau"}
        for k, v in roll.items():
            self.log(f"val/{k}", v, batch_size=n, prog_bar=f"val/{k}" in bar)

    # The input-noise RNG travels with checkpoints so a resumed run continues the same stream.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng"])

    def configure_optimizers(self) -> dict:
        params = [p for p in self.head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        if self.steps_per_epoch:  # counted before DDP split the batches between ranks
            total = max(self.steps_per_epoch // max(self.trainer.world_size, 1), 1) * epochs
        else:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(self.warmup_steps, max(total // 10, 1))
        stage2_step = None if self.stage2_epoch is None else total * self.stage2_epoch // epochs

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10%
            scale = 1.0
            if stage2_step is not None and step >= stage2_step:
                scale = self.stage2_lr_scale
            if step < warm:
                return scale * (step + 1) / warm
            return scale * max(0.1, 1 - 0.9 * (step - warm) / max(total - warm, 1))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
