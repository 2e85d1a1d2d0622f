"""Hedge routing (ALGORITHMS.md section 10; HedgeSpec, arXiv 2510.20064): one drafter drafts per
cycle, chosen from exponential weights over every drafter's counterfactual score on the
verified tokens (full information: the catch-up forward every drafter runs yields them free).

weights = softmax(eta * S), S_d the (optionally discounted) sum of drafter d's scores;
`choose="sample"` draws the drafter from the weights (Hedge proper), `"argmax"` takes the
heaviest (follow the leader). `discount` < 1 forgets old cycles (S <- discount S + score), so
the router follows a workload whose task changes; 1 is plain Hedge. `feedback_every` m: the
drafters that did not draft catch up, and the weights learn, every m cycles (OnlineRouter)."""

from __future__ import annotations

import torch
from torch import Tensor

from taps.combine.group import heads_to_drafters
from taps.combine.online import OnlineRouter
from taps.engine.decoder import Proposer
from taps.engine.drafting import TreeSpec
from taps.models.heads import AnyHead

CHOICES = ("sample", "argmax")


class HedgeRouter(OnlineRouter):
    def __init__(
        self,
        drafters: list[Proposer],
        eta: float = 1.0,
        discount: float = 1.0,
        choose: str = "sample",
        reset: str = "never",
        seed: int = 0,
        feedback_every: int = 1,
    ) -> None:
        if eta <= 0 or not 0 < discount <= 1 or choose not in CHOICES:
            raise ValueError(
                f"routing: need eta > 0 (got {eta}), 0 < discount <= 1 (got {discount}) and "
                f"choose in {CHOICES} (got {choose!r})"
            )
        self.eta, self.discount, self.mode = eta, discount, choose
        super().__init__(drafters, reset, seed, feedback_every)

    def forget(self) -> None:
        self.scores = torch.zeros(len(self.drafters), dtype=torch.float64)

    def weights(self) -> Tensor:
        return torch.softmax(self.eta * self.scores, 0)

    def choose(self) -> tuple[int, list[float]]:
        w = self.weights()
        if self.mode == "argmax":
            i = int(w.argmax())
        else:
            i = int(torch.multinomial(w, 1, generator=self.rng))
        return i, w.tolist()

    def learn(self, scores: Tensor) -> None:
        for row in scores:  # in cycle order: the discount forgets the older ones
            self.scores = self.discount * self.scores + row


def build(
    heads: list[AnyHead],
    spec: TreeSpec,
    eta: float = 1.0,
    discount: float = 1.0,
    choose: str = "sample",
    reset: str = "never",
    seed: int = 0,
    feedback_every: int = 1,
) -> HedgeRouter:
    drafters = heads_to_drafters(heads, [spec] * len(heads))
    return HedgeRouter(drafters, eta, discount, choose, reset, seed, feedback_every)
