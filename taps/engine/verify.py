"""Acceptance rules (ALGORITHMS.md section 5). Both return the accepted path (tree node indices,
root first) and the bonus token the target contributes after it."""

from __future__ import annotations

import torch
from torch import Tensor

from taps.engine.tree import DraftTree


def accept_greedy(tree: DraftTree, target_logits: Tensor) -> tuple[list[int], int]:
    """A node is accepted when its token is the target's argmax at its parent and its parent
    was accepted; the deepest accepted node wins (first in tree order on ties)."""
    best = target_logits.argmax(-1).tolist()
    tokens = tree.tokens.tolist()
    ok = [True] + [False] * (len(tree) - 1)
    deepest = 0
    for i in range(1, len(tree)):
        p = tree.parents[i]
        ok[i] = ok[p] and tokens[i] == best[p]
        if ok[i] and tree.depths[i] > tree.depths[deepest]:
            deepest = i
    return tree.path_to(deepest), best[deepest]


def target_probs(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """The target's sampling distribution: temperature, then nucleus (top-p) truncation.
    The same processing serves every accepted node and the bonus token."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_sampling(
    tree: DraftTree,
    target_logits: Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Multi-candidate rejection with deterministic (one-hot) drafts: at each accepted node try
    its distinct children in draft-rank order, accepting child x with probability p(x); on
    rejection zero p(x) and renormalise. The output is distributed exactly as the target's."""
    probs = target_probs(target_logits, temperature, top_p).cpu()
    children: list[list[int]] = [[] for _ in range(len(tree))]
    for i, p in enumerate(tree.parents[1:], start=1):
        children[p].append(i)
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        p = probs[node].clone()
        kids = sorted(children[node], key=lambda c: -float(tree.logprobs[c]))
        moved = False
        tried: set[int] = set()
        for c in kids:
            x = tokens[c]
            if x in tried:  # a duplicate token was already rejected (p(x) is now 0)
                continue
            tried.add(x)
            u = torch.rand((), generator=generator, dtype=torch.float64)
            if u < p[x]:
                node, moved = c, True
                path.append(c)
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:  # every token with mass was drafted and rejected: cannot happen
                break  # with exact arithmetic; fall back to the untouched distribution
            p = p / total
        if not moved:
            if p.sum() <= 0:
                p = probs[node]
            bonus = int(torch.multinomial(p.float(), 1, generator=generator))
            return path, bonus
