"""Entropy routing (ALGORITHMS.md section 7): per turn, probe each drafter with its prefill and
one tree; the drafter whose draft distributions have the lowest mean entropy decodes the whole
turn. Its probe tree is the first tree verified, so the probe costs only the other drafters."""

from __future__ import annotations

from torch import Tensor

from taps.combine.group import DrafterGroup, heads_to_drafters
from taps.engine.decoder import Proposer
from taps.engine.drafting import TreeSpec
from taps.engine.tree import DraftTree
from taps.models.heads import AnyHead
from taps.models.llama import TargetStates


class EntropyRouter(DrafterGroup):
    def __init__(self, drafters: list[Proposer]) -> None:
        super().__init__(drafters)
        self.active = 0
        self.pending: DraftTree | None = None

    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        super().start(states, next_tokens, max_len)
        trees = self.propose_all()
        scores = [-t.mean_entropy() for t in trees]  # higher preferred: lowest entropy wins
        self.active = max(range(len(trees)), key=scores.__getitem__)
        self.pending = trees[self.active]
        self.pending.draft_forwards = sum(t.draft_forwards for t in trees)
        self.pending.route_scores = scores

    def propose(self) -> DraftTree:
        tree, self.pending = self.pending, None
        if tree is None:
            tree = self.drafters[self.active].propose()
            tree.drafter = self.active
        return tree

    def commit(self, states: TargetStates, next_tokens: Tensor) -> None:
        # Only the chosen drafter drafts again this turn; the others restart at the next one.
        self.drafters[self.active].commit(states, next_tokens)


def build(heads: list[AnyHead], spec: TreeSpec) -> EntropyRouter:
    return EntropyRouter(heads_to_drafters(heads, [spec] * len(heads)))
