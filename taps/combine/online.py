"""What online routers (hedge, bandit) share: one drafter drafts per cycle, the drafters catch
up on the verified tokens, and the router learns from how well drafters would have done.

The router's state lives for a session: a benchmark cell (`new_session`, called by the
evaluation before its first prompt), as in a server that sees one prompt after another; with
`reset="prompt"` it restarts at every prompt instead.

Catch-up is deferred: a drafter commits the cycles it missed in one forward when it is chosen
to draft, or, for full-information routers, every `feedback_every` cycles, when every drafter
catches up and is scored on the cycles since (1 = every cycle). A head's forward over several
cycles' pairs equals its forwards cycle by cycle (causal attention), so scores are the same,
only later; on a CPU one forward over 12 pairs costs about what one over 3 does. Bandits
(`feedback_every=None`) never need the drafters they did not choose.

Counterfactual scores (ALGORITHMS.md section 10) come from the catch-up forwards:
`HeadDrafter.predictions` are its outputs predicting each caught-up token. They are kept and
scored at feedback time, one LM-head call per drafter over all its rows since, not one per
catch-up (with the presets' 8192-token draft vocabulary the saving did not show in hedge's time
per cycle on the stream: experiments/README.md, "Online selection").
- greedy (T = 0): the length of the drafter's top-1 agreement prefix with a cycle's verified
  tokens;
- sampling (T > 0): its expected accepted length sum_k prod_{i<=k} q(x_i) under its own
  proposal q (the draft softmax), x the cycle's verified tokens.
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


def counterfactual_scores(
    drafter: HeadDrafter, cycles: list[Tensor], greedy: bool, rows: Tensor | None = None
) -> list[float]:
    """Per cycle, how many of its verified tokens `drafter` would have had accepted; `rows`
    (default: the drafter's last predictions) predict these cycles' tokens, in order."""
    verified = torch.cat(cycles)
    rows = (drafter.predictions if rows is None else rows)[-len(verified) :]
    logits = drafter.head.logits(rows).float()
    verified = verified.to(rows.device)
    if greedy:
        p = (drafter.head.to_target(logits.argmax(-1)) == verified).double()
    else:
        q = torch.softmax(logits, -1)
        index = _draft_index(drafter, verified)
        p = torch.where(index >= 0, q.gather(-1, index.clamp(min=0)[:, None])[:, 0], 0.0).double()
    parts = p.split([len(c) for c in cycles])
    return torch.stack([part.cumprod(0).sum() for part in parts]).tolist()


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
    """One drafter's tree per cycle, chosen by `choose`; `observe` sees the chosen drafter's
    accepted length each cycle, `learn` every drafter's scores every `feedback_every` cycles."""

    def __init__(
        self,
        drafters: list[Proposer],
        reset: str = "never",
        seed: int = 0,
        feedback_every: int | None = None,
    ) -> None:
        super().__init__(drafters)
        if reset not in RESETS:
            raise ValueError(f"routing.reset={reset!r}: expected one of {RESETS}")
        if feedback_every is not None and feedback_every < 1:
            raise ValueError(f"routing.feedback_every={feedback_every}: need >= 1")
        self.reset, self.seed, self.feedback_every = reset, seed, feedback_every
        self.temperature = 0.0
        self.chosen = 0
        self.new_session()

    def new_session(self) -> None:
        self.rng = torch.Generator().manual_seed(self.seed)
        self._drop_pending()
        self.forget()

    def forget(self) -> None:
        """Reset what the router has learnt (a new session or, with reset=prompt, prompt)."""

    def choose(self) -> tuple[int, list[float]]:
        """(drafter to draft, every drafter's routing weight now)."""
        raise NotImplementedError

    def observe(self, accepted: int) -> None:
        """Bandit feedback: the chosen drafter accepted `accepted` draft tokens this cycle."""

    def learn(self, scores: Tensor) -> None:
        """Full information: scores [cycles, drafters] of the cycles since the last call."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def set_sampling(self, temperature: float, generator: torch.Generator | None) -> None:
        self.temperature = temperature
        super().set_sampling(temperature, generator)

    def _drop_pending(self) -> None:
        k = len(self.drafters)
        self.pending: list[list[tuple[TargetStates, Tensor]]] = [[] for _ in range(k)]
        # Per drafter, the cycles caught up but not scored yet and the head's rows for them.
        self.unscored: list[list[tuple[Tensor, list[Tensor]]]] = [[] for _ in range(k)]
        self.cycles = 0
        self.forwards = 0  # catch-up forwards since the last tree, billed to the next one

    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        if self.reset == "never" and self.feedback_every:
            self.feedback()  # the last prompt's remaining cycles, before the caches restart
        if self.reset == "prompt":
            self.forget()
        carried = self.forwards
        self._drop_pending()
        super().start(states, next_tokens, max_len)
        self.forwards = carried + len(self.drafters)  # and every drafter's prefill

    def propose(self) -> DraftTree:
        self.chosen, weights = self.choose()
        self._catch_up(self.chosen)
        tree = self.drafters[self.chosen].propose()
        tree.drafter = self.chosen
        # Its own drafting rounds (the tree counts one catch-up too) plus the catch-ups run.
        tree.draft_forwards += self.forwards - 1
        self.forwards = 0
        tree.route_scores = weights
        return tree

    def commit(self, states: TargetStates, next_tokens: Tensor) -> None:
        for p in self.pending:
            p.append((states, next_tokens))
        self.observe(len(next_tokens) - 1)
        self.cycles += 1
        if self.feedback_every and self.cycles % self.feedback_every == 0:
            self.feedback()

    def feedback(self) -> None:
        """Catch every drafter up, score each on the cycles since the last feedback (one LM-head
        call per drafter) and `learn` from those scores."""
        scores = []
        for i, drafter in enumerate(self.drafters):
            self._catch_up(i)
            rows = [r for r, _ in self.unscored[i]]
            cycles = [c for _, cs in self.unscored[i] for c in cs]
            self.unscored[i] = []
            scores.append(
                counterfactual_scores(drafter, cycles, self.greedy, torch.cat(rows)) if rows else []
            )
        if scores[0]:  # every drafter is caught up on the same cycles now
            self.learn(torch.tensor(scores, dtype=torch.float64).T)

    def _catch_up(self, i: int) -> None:
        """Commit drafter i's missed cycles in one forward (kept for scoring when feedback is on)."""
        pending, self.pending[i] = self.pending[i], []
        if not pending:
            return
        states = TargetStates.cat([s for s, _ in pending])
        self.drafters[i].commit(states, torch.cat([t for _, t in pending]))
        self.forwards += 1
        if self.feedback_every:
            cycles = [t for _, t in pending]
            rows = self.drafters[i].predictions[-sum(len(c) for c in cycles) :]
            self.unscored[i].append((rows, cycles))
