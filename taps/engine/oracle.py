"""The target drafting for itself: the ceiling of any drafter on a given tree shape.

`OracleDrafter` builds the same EAGLE-2 dynamic tree as `HeadDrafter`, but from the target's
own next-token distributions (a second copy of its KV cache, one target forward per tree
level). Its tau is what a perfect drafter would reach with that tree and the target's own
entropy: at T=0 it accepts every level (depth + 1 tokens a cycle, plus the bonus); at T=1
it accepts a child with the target's probability mass on the drafted tokens, so its tau
says how far sampling can go on this target whatever the drafter. It costs a target forward
per level, so its tokens/s mean nothing: only its tau is a measurement
(`experiments/speed.py` method `oracle`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.llama import KVCache, Llama, TargetStates


class _TargetAsHead:
    """The target behind the calls `HeadDrafter` makes of a draft head. A head sees pairs
    (f_t, x_{t+1}) at position t; the target sees x_{t+1} at position t + 1, which differs
    by a constant offset that rotary attention cannot see. The features are ignored."""

    def __init__(self, target: Llama) -> None:
        self.target = target
        self.fc = target.lm_head  # HeadDrafter reads the device and dtype from fc.weight

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return self.target.new_cache(max_len, batch)

    def input_features(self, states: TargetStates) -> Tensor:
        return states.final

    def __call__(
        self,
        features: Tensor,
        next_tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return self.target.states(next_tokens, positions, cache, mask).final

    def logits(self, g: Tensor) -> Tensor:
        return self.target.logits(g)

    def to_target(self, ids: Tensor) -> Tensor:
        return ids


class OracleDrafter(HeadDrafter):
    """A `Proposer` whose draft distribution is the target's own (see the module docstring)."""

    def __init__(self, target: Llama, spec: TreeSpec) -> None:
        super().__init__(_TargetAsHead(target), spec)  # type: ignore[arg-type]
        self.first: int | None = None

    @property
    def heads(self) -> list:
        return []  # nothing to cast, export or count: the target is cast with the target

    def set_prompt(self, prompt: list[int]) -> None:
        """The decoder hands over the prompt: a head's catch-up starts at prompt[1:], but the
        target must read the prompt's first token too, or its distributions are not the
        verifier's."""
        self.first = prompt[0]

    @torch.no_grad()
    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        if self.first is None:
            raise RuntimeError("OracleDrafter.start before set_prompt: decode through "
                               "SpeculativeDecoder (alone or inside a combination strategy), "
                               "which hands it the prompt")  # fmt: skip
        first = torch.tensor([self.first], dtype=next_tokens.dtype, device=next_tokens.device)
        super().start(states, torch.cat([first, next_tokens]), max_len + 1)
