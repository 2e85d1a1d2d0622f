"""Training objectives of a draft head, built by Hydra from `drafter.objective` (`_target_`).

An objective maps a batch to (loss, metrics). Both train the same EAGLE head; they differ only
in the loss (ALGORITHMS.md section 3):

- `Eagle2Objective`: SmoothL1 on features + soft cross-entropy on tokens (`eagle_loss`).
- `HassObjective`: the same losses summed over `steps` harmonized context-alignment steps, plus
  top-K distillation (`hass_loss`).
- `Eagle3Objective`: an EAGLE-3 head's training-time test, cross-entropy only (`eagle3_loss`);
  its f_in are the target's concatenated auxiliary layers.

`first_stage()` is the objective of the first stage of a two-stage schedule
(`drafter.two_stage`): HASS's reference trains its first epochs without distillation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from torch import Tensor

from taps.models.draft_head import DraftHead
from taps.models.eagle3_head import Eagle3Head
from taps.training.eagle3 import eagle3_loss
from taps.training.hass import HassConfig, hass_loss
from taps.training.losses import LossWeights, eagle_loss


class Objective(Protocol):
    def __call__(
        self,
        head: DraftHead,
        f_in: Tensor,
        tokens: Tensor,
        f_next: Tensor,
        mask: Tensor,
        top: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, metrics) for a batch: f_in, f_next [B, n, h]; tokens, mask [B, n]; top [B, n]
        the target's argmax at f_next where the features hold it (EAGLE-3's), else None."""
        ...

    def first_stage(self) -> Objective:
        """The objective before `drafter.stage2_epoch` in a two-stage schedule."""
        ...


@dataclass(frozen=True)
class Eagle2Objective:
    feature_weight: float = 1.0
    token_weight: float = 0.1

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.feature_weight, self.token_weight)

    def __call__(
        self,
        head: DraftHead,
        f_in: Tensor,
        tokens: Tensor,
        f_next: Tensor,
        mask: Tensor,
        top: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        g = head(f_in, tokens)
        return eagle_loss(g, f_next, mask, head.lm_head_weight, self.weights)

    def first_stage(self) -> Objective:
        raise ValueError(
            f"drafter.two_stage applies to an objective with stages, such as HassObjective "
            f"(it stages top-K distillation); {type(self).__name__} has none"
        )


@dataclass(frozen=True)
class HassObjective(Eagle2Objective):
    steps: int = 3  # forward steps of context alignment (1 = plain EAGLE-2)
    topk: int = 10
    topk_weight: float = 1.0

    @property
    def hass(self) -> HassConfig:
        return HassConfig(self.steps, self.topk, self.topk_weight)

    def __call__(
        self,
        head: DraftHead,
        f_in: Tensor,
        tokens: Tensor,
        f_next: Tensor,
        mask: Tensor,
        top: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return hass_loss(head, f_in, tokens, f_next, mask, self.weights, self.hass)

    def first_stage(self) -> Objective:
        """The reference's first stage: context alignment without top-K distillation."""
        return replace(self, topk_weight=0.0)


@dataclass(frozen=True)
class Eagle3Objective:
    steps: int = 7  # training-time test depth (reference 7)
    decay: float = 0.8  # weight of step k is decay^(k-1) (reference 0.8)

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 < self.decay <= 1:
            raise ValueError(f"drafter.ttt_steps={self.steps} must be >= 1, decay in (0, 1]")

    def __call__(
        self,
        head: Eagle3Head,
        f_in: Tensor,
        tokens: Tensor,
        f_next: Tensor,
        mask: Tensor,
        top: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(head, Eagle3Head):
            raise TypeError("Eagle3Objective trains an EAGLE-3 head (drafter.kind=eagle3)")
        return eagle3_loss(head, f_in, tokens, f_next, mask, self.steps, self.decay, top)

    def first_stage(self) -> Objective:
        raise ValueError("drafter.two_stage applies to HassObjective; Eagle3Objective has none")
