"""Strategies that turn one or more draft heads into a `Proposer` for the shared engine."""

from __future__ import annotations

from taps.engine.decoder import Proposer
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead

STRATEGIES = ("single",)


def build_proposer(routing: str, heads: list[DraftHead], spec: TreeSpec) -> Proposer:
    """routing=single: one head drafts every tree."""
    if routing not in STRATEGIES:
        raise ValueError(f"routing={routing!r} is not implemented; choose one of {STRATEGIES}")
    if len(heads) != 1:
        raise ValueError(f"routing=single takes exactly one drafter, got {len(heads)}")
    return HeadDrafter(heads[0], spec)
