"""Confidence routing (ALGORITHMS.md section 7): per cycle every drafter builds its tree from
the same state; the tree with the highest mean node confidence is verified. Drafting cost
grows with the number of drafters (recorded as draft_forwards)."""

from __future__ import annotations

from taps.combine.group import DrafterGroup, heads_to_drafters
from taps.engine.drafting import TreeSpec
from taps.engine.tree import DraftTree
from taps.models.heads import AnyHead


class ConfidenceRouter(DrafterGroup):
    def propose(self) -> DraftTree:
        trees = self.propose_all()
        scores = [t.confidence() for t in trees]
        best = trees[max(range(len(trees)), key=scores.__getitem__)]
        best.draft_forwards = sum(t.draft_forwards for t in trees)
        best.route_scores = scores
        return best


def build(heads: list[AnyHead], spec: TreeSpec) -> ConfidenceRouter:
    return ConfidenceRouter(heads_to_drafters(heads, [spec] * len(heads)))
