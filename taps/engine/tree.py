"""A draft tree: nodes in parent-before-child order, node 0 the root (the last committed token
that the target has not yet processed). A chain is the tree whose every node has one child."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DraftTree:
    tokens: Tensor  # [N] long
    parents: list[int]  # parents[0] == -1; parents[i] < i
    logprobs: Tensor  # [N] draft log q(node | parent); 0 for the root
    scores: Tensor  # [N] cumulative draft log-prob from the root (confidence = exp)
    entropies: Tensor  # [N] entropy of the draft distribution the node was drawn from
    drafter: int = 0  # index of the drafter that built it (strategies with several heads)
    draft_forwards: int = 0  # head forwards spent on it (catch-up included)
    # Routing strategies: every drafter's score this cycle, higher preferred (None: no routing).
    route_scores: list[float] | None = None
    # Sampled trees (TreeSpec.sampled, T > 0): node -> (target ids, probabilities) of the draft
    # distribution q its children were drawn from without replacement, in tree order.
    # Acceptance then runs recursive rejection against q (ALGORITHMS.md section 5).
    draft_dists: dict[int, tuple[Tensor, Tensor]] | None = None

    def __post_init__(self) -> None:
        depth = [0] * len(self.parents)
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: nodes must follow their parents")
            depth[i] = depth[p] + 1
        self.depths = depth
        self.children: list[list[int]] = [[] for _ in self.parents]  # in tree order
        for i, p in enumerate(self.parents[1:], start=1):
            self.children[p].append(i)

    def __len__(self) -> int:
        return len(self.parents)

    def ancestor_mask(self) -> Tensor:
        """Bool [N, N]: node i may attend to node j iff j is i or one of its ancestors."""
        n = len(self)
        m = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                m[i] = m[p]
            m[i, i] = True
        return m

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def confidence(self) -> float:
        """Mean over draft nodes of exp(cumulative log-prob): TAPS's routing signal."""
        if len(self) < 2:
            return 0.0
        return float(self.scores[1:].exp().mean())

    def mean_entropy(self) -> float:
        """Mean entropy of the draft distributions the tree expanded (one per parent node, so
        a distribution counts once however many of its children were kept)."""
        per_parent = {p: float(self.entropies[i]) for i, p in enumerate(self.parents) if i > 0}
        return sum(per_parent.values()) / max(len(per_parent), 1)


def chain_tree(
    root: int, tokens: list[int], logprobs: list[float], entropies: list[float]
) -> DraftTree:
    """A chain as a tree (used by tests and by drafters with top_k = 1)."""
    n = len(tokens)
    lp = torch.tensor([0.0, *logprobs], dtype=torch.float64)
    return DraftTree(
        tokens=torch.tensor([root, *tokens]),
        parents=[-1, *range(n)],
        logprobs=lp,
        scores=lp.cumsum(0),
        entropies=torch.tensor([0.0, *entropies], dtype=torch.float64),
    )


def verification_inputs(
    tree: DraftTree, prefix_len: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids [1, N], positions [1, N] (prefix + depth) and the bool mask [N, prefix + N]
    that lets each node see the committed prefix, the root and its own ancestors only."""
    n = len(tree)
    mask = torch.ones(n, prefix_len + n, dtype=torch.bool)
    mask[:, prefix_len:] = tree.ancestor_mask()
    positions = prefix_len + torch.tensor(tree.depths)
    return tree.tokens[None].to(device), positions[None].to(device), mask.to(device)
