"""One drafter alone: the baseline every combination is compared with."""

from __future__ import annotations

from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.heads import AnyHead


def build(heads: list[AnyHead], spec: TreeSpec) -> HeadDrafter:
    if len(heads) != 1:
        raise ValueError(f"routing=single takes exactly one drafter, got {len(heads)}")
    return HeadDrafter(heads[0], spec)
