"""The bandit baseline of online routing: one drafter drafts per cycle and the router learns
only from that drafter's own accepted length (bandit feedback), where Hedge scores every
drafter (taps/combine/hedge.py). Rewards are accepted draft tokens over the most a tree can
accept (its draft levels), so they lie in [0, 1]. A drafter catches up only when it is chosen.

- `ucb` (UCB1): the drafter with the best mean reward plus c * sqrt(2 ln t / n_d); untried first.
- `exp3`: sample from (1 - gamma) w / sum(w) + gamma / K; importance-weighted updates."""

from __future__ import annotations

import math

import torch

from taps.combine.group import heads_to_drafters
from taps.combine.online import OnlineRouter
from taps.engine.decoder import Proposer
from taps.engine.drafting import TreeSpec
from taps.models.heads import AnyHead

ALGORITHMS = ("ucb", "exp3")


class BanditRouter(OnlineRouter):
    def __init__(
        self,
        drafters: list[Proposer],
        algorithm: str = "ucb",
        exploration: float = 1.0,
        reset: str = "never",
        seed: int = 0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"routing.algorithm={algorithm!r}: expected one of {ALGORITHMS}")
        if not (exploration > 0 and (algorithm == "ucb" or exploration <= 1)):
            raise ValueError(f"routing.exploration={exploration}: need > 0 (and <= 1 for exp3)")
        self.algorithm, self.exploration = algorithm, exploration
        self.depths = [getattr(d, "spec", None) for d in drafters]
        super().__init__(drafters, reset, seed)

    def forget(self) -> None:
        k = len(self.drafters)
        self.pulls, self.total = [0] * k, [0.0] * k
        self.log_w = torch.zeros(k, dtype=torch.float64)
        self.probs = torch.full((k,), 1.0 / k, dtype=torch.float64)

    def choose(self) -> tuple[int, list[float]]:
        k = len(self.drafters)
        if self.algorithm == "exp3":
            w = torch.softmax(self.log_w, 0)
            self.probs = (1 - self.exploration) * w + self.exploration / k
            return int(torch.multinomial(self.probs, 1, generator=self.rng)), self.probs.tolist()
        untried = [i for i in range(k) if self.pulls[i] == 0]
        means = [self.total[i] / max(self.pulls[i], 1) for i in range(k)]
        if untried:
            return untried[0], means
        t = sum(self.pulls)
        bonus = [self.exploration * math.sqrt(2 * math.log(t) / n) for n in self.pulls]
        return max(range(k), key=lambda i: means[i] + bonus[i]), means

    def observe(self, accepted: int) -> None:
        spec = self.depths[self.chosen]
        most = max(accepted, 1) if spec is None else spec.draft_levels(self.temperature)
        reward = min(accepted / most, 1.0)
        i = self.chosen
        if self.algorithm == "exp3":
            k = len(self.drafters)
            self.log_w[i] += self.exploration * reward / (float(self.probs[i]) * k)
        self.pulls[i] += 1
        self.total[i] += reward


def build(
    heads: list[AnyHead],
    spec: TreeSpec,
    algorithm: str = "ucb",
    exploration: float = 1.0,
    reset: str = "never",
    seed: int = 0,
) -> BanditRouter:
    drafters = heads_to_drafters(heads, [spec] * len(heads))
    return BanditRouter(drafters, algorithm, exploration, reset, seed)
