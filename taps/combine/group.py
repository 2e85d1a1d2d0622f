"""Several draft heads kept in step on one committed state: the base of every strategy that
drafts with more than one head. The decoding loop stays in the engine; a group only decides
which tree(s) to hand it."""

from __future__ import annotations

import torch
from torch import Tensor

from taps.engine.decoder import Proposer
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.engine.tree import DraftTree
from taps.models.heads import AnyHead
from taps.models.llama import TargetStates


def split_budget(spec: TreeSpec, n: int) -> list[TreeSpec]:
    """Share one tree's draft tokens among n trees (59 = 30 + 29 for a 60-token tree and two
    drafters), so that their merge verifies no more tokens than a single tree."""
    draft = spec.total_tokens - 1
    if draft < n:
        raise ValueError(f"routing.budget=matched: {draft} draft tokens cannot feed {n} drafters")
    shares = [draft // n + (i < draft % n) for i in range(n)]
    return [TreeSpec(spec.top_k, spec.depth, s + 1, spec.name) for s in shares]


class DrafterGroup:
    """Every drafter prefills on the prompt and catches up on every accepted path, so any of
    them can draft the next tree from the same state. Drafters are any `Proposer`s (normally
    `HeadDrafter`s; see `heads_to_drafters`)."""

    def __init__(self, drafters: list[Proposer]) -> None:
        if len(drafters) < 2:
            raise ValueError(
                f"{type(self).__name__} combines drafters: got {len(drafters)}; name two or "
                "more with data=<mixture> or drafters=[...]"
            )
        self.drafters = drafters
        self.max_tree = max(d.max_tree for d in drafters)

    @property
    def heads(self) -> list[AnyHead]:
        return [h for d in self.drafters for h in d.heads]

    def set_prompt(self, prompt: list[int]) -> None:
        """Hand the prompt on to the drafters that read it (the oracle reads prompt[0])."""
        for d in self.drafters:
            if hasattr(d, "set_prompt"):
                d.set_prompt(prompt)

    def set_sampling(self, temperature: float, generator: torch.Generator | None) -> None:
        """Hand the decoder's temperature and generator on to drafters that draw their trees."""
        for d in self.drafters:
            if hasattr(d, "set_sampling"):
                d.set_sampling(temperature, generator)

    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        for d in self.drafters:
            d.start(states, next_tokens, max_len)

    def commit(self, states: TargetStates, next_tokens: Tensor) -> None:
        for d in self.drafters:
            d.commit(states, next_tokens)

    def propose_all(self) -> list[DraftTree]:
        trees = [d.propose() for d in self.drafters]
        for i, t in enumerate(trees):
            t.drafter = i
        return trees


def heads_to_drafters(heads: list[AnyHead], specs: list[TreeSpec]) -> list[HeadDrafter]:
    if len(specs) != len(heads):
        raise ValueError(f"{len(heads)} heads but {len(specs)} tree specs")
    return [HeadDrafter(h, s, index=i) for i, (h, s) in enumerate(zip(heads, specs, strict=True))]
