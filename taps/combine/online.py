"""What online routers (hedge, bandit) share: one drafter drafts per cycle, every drafter catches
up on the verified tokens, and the router learns from how well drafters would have done.

The router's state lives for a session: a benchmark cell (`new_session`, called by the
evaluation before its first prompt), as in a server that sees one prompt after another; with
`reset="prompt"` it restarts at every prompt instead.

Counterfactual scores (ALGORITHMS.md section 10) come from the catch-up forward every drafter
runs anyway: `HeadDrafter.predictions` are its outputs predicting each verified token.
- greedy (T = 0): the length of the drafter's top-1 agreement prefix with the verified tokens;
- sampling (T > 0): its expected accepted length sum_k prod_{i<=k} q(x_i) under its own
  proposal q (the draft softmax), x the verified tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taps.combine.group import DrafterGroup
from taps.engine.decoder import Proposer
from taps.engine.drafting import HeadDrafter
from taps.engine.tree import DraftTree
from taps.models.llama import TargetStates

RESETS = ("never", "prompt")


def counterfactual_score(drafter: HeadDrafter, verified: Tensor, greedy: bool) -> float:
    """How many of the verified tokens `drafter` would have had accepted (see module doc)."""
    rows = drafter.predictions[-len(verified) :]
    logits = drafter.head.logits(rows).float()
    if greedy:
        hit = (drafter.head.to_target(logits.argmax(-1)) == verified.to(rows.device)).long()
        return float(hit.cumprod(0).sum())
    q = torch.softmax(logits, -1)
    index = _draft_index(drafter, verified.to(rows.device))
    p = torch.where(index >= 0, q.gather(-1, index.clamp(min=0)[:, None])[:, 0], 0.0)
    return float(p.double().cumprod(0).sum())


def _draft_index(drafter: HeadDrafter, tokens: Tensor) -> Tensor:
    """Target ids -> the head's draft-vocabulary index (-1 where it cannot draft the token)."""
    d2t = drafter.head.d2t
    if d2t is None:
        return tokens
    t2d = getattr(drafter, "_t2d", None)
    if t2d is None:
        t2d = torch.full((drafter.head.lm_head_full.shape[0],), -1, device=d2t.device)
        t2d[d2t] = torch.arange(len(d2t), device=d2t.device)
        drafter._t2d = t2d  # type: ignore[attr-defined]
    return t2d[tokens]


class OnlineRouter(DrafterGroup):
    """One drafter's tree per cycle, chosen by `choose`; `learn` sees the cycle's outcome."""

    def __init__(self, drafters: list[Proposer], reset: str = "never", seed: int = 0) -> None:
        super().__init__(drafters)
        if reset not in RESETS:
            raise ValueError(f"routing.reset={reset!r}: expected one of {RESETS}")
        self.reset, self.seed = reset, seed
        self.greedy = True
        self.chosen = 0
        self.new_session()

    def new_session(self) -> None:
        self.rng = torch.Generator().manual_seed(self.seed)
        self.forget()

    def forget(self) -> None:
        """Reset what the router has learnt (a new session or, with reset=prompt, prompt)."""

    def choose(self) -> tuple[int, list[float]]:
        """(drafter to draft, every drafter's routing weight now)."""
        raise NotImplementedError

    def learn(self, verified: Tensor, accepted: int) -> None:
        """The cycle's outcome: the verified tokens (accepted + bonus), the chosen's accepted."""
        raise NotImplementedError

    def set_temperature(self, temperature: float) -> None:
        self.greedy = temperature <= 0

    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        if self.reset == "prompt":
            self.forget()
        super().start(states, next_tokens, max_len)

    def propose(self) -> DraftTree:
        self.chosen, weights = self.choose()
        tree = self.drafters[self.chosen].propose()
        tree.drafter = self.chosen
        # The chosen tree's forwards, plus one catch-up forward of every other drafter.
        tree.draft_forwards += len(self.drafters) - 1
        tree.route_scores = weights
        return tree

    def commit(self, states: TargetStates, next_tokens: Tensor) -> None:
        super().commit(states, next_tokens)
        self.learn(next_tokens, len(next_tokens) - 1)
