"""Merged-tree verification (ALGORITHMS.md section 7): the drafters' trees share the root and
are packed into one tree, verified in one target forward; the candidate paths are the union
of theirs, and the usual greedy or sampling acceptance picks one, so the merge is lossless.

TAPS appended the trees without deduplication and so verified about twice a single tree's
tokens. Here `dedup` verifies a path the drafters share once, and `budget=matched` gives the
drafters a share of one tree's budget each, so the merge costs what a single tree costs."""

from __future__ import annotations

import torch

from taps.combine.group import DrafterGroup, heads_to_drafters, split_budget
from taps.engine.decoder import Proposer
from taps.engine.drafting import TreeSpec
from taps.engine.tree import DraftTree
from taps.models.heads import AnyHead

BUDGETS = ("full", "matched")


def merge_trees(trees: list[DraftTree], dedup: bool = True) -> DraftTree:
    """One tree holding every path of `trees` (which must share the root token). With dedup,
    a node whose parent and token match an existing node is that node (the trie of all paths);
    it keeps the highest draft score and log-prob of its copies."""
    root = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root for t in trees):
        raise ValueError("merged trees must share their root token")
    tokens, parents = [root], [-1]
    logprobs, scores, entropies = [0.0], [0.0], [0.0]
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        tok, par = tree.tokens.tolist(), tree.parents
        where = [0]  # this tree's node -> merged node
        for i in range(1, len(tree)):
            key = (where[par[i]], tok[i])
            j = index.get(key) if dedup else None
            if j is None:
                j = len(tokens)
                tokens.append(tok[i])
                parents.append(key[0])
                logprobs.append(float(tree.logprobs[i]))
                scores.append(float(tree.scores[i]))
                entropies.append(float(tree.entropies[i]))
                index[key] = j
            else:
                logprobs[j] = max(logprobs[j], float(tree.logprobs[i]))
                scores[j] = max(scores[j], float(tree.scores[i]))
            where.append(j)
    f64 = torch.float64
    return DraftTree(
        tokens=torch.tensor(tokens),
        parents=parents,
        logprobs=torch.tensor(logprobs, dtype=f64),
        scores=torch.tensor(scores, dtype=f64),
        entropies=torch.tensor(entropies, dtype=f64),
        drafter=-1,  # every drafter
        draft_forwards=sum(t.draft_forwards for t in trees),
    )


class MergedTrees(DrafterGroup):
    def __init__(self, drafters: list[Proposer], dedup: bool = True) -> None:
        super().__init__(drafters)
        self.dedup = dedup
        self.max_tree = sum(d.max_tree for d in drafters) - (len(drafters) - 1)

    def propose(self) -> DraftTree:
        return merge_trees(self.propose_all(), self.dedup)


def build(
    heads: list[AnyHead], spec: TreeSpec, budget: str = "full", dedup: bool = True
) -> MergedTrees:
    if budget not in BUDGETS:
        raise ValueError(f"routing.budget={budget!r}: expected one of {BUDGETS}")
    specs = split_budget(spec, len(heads)) if budget == "matched" else [spec] * len(heads)
    return MergedTrees(heads_to_drafters(heads, specs), bool(dedup))
