"""Strategies that turn one or more draft heads into a `Proposer` for the shared engine.

Each strategy is a module with `build(heads, spec, **options)`; `routing=<name>` selects it and
the routing config's other keys (except `label` and `drafters`) are its options."""

from __future__ import annotations

import inspect

from taps.combine import average, confidence, entropy, merged
from taps.engine.decoder import Proposer
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead


def _single(heads: list[DraftHead], spec: TreeSpec) -> HeadDrafter:
    if len(heads) != 1:
        raise ValueError(f"routing=single takes exactly one drafter, got {len(heads)}")
    return HeadDrafter(heads[0], spec)


BUILDERS = {
    "single": _single,
    "average": average.build,
    "confidence": confidence.build,
    "entropy": entropy.build,
    "merged_tree": merged.build,
}
STRATEGIES = tuple(BUILDERS)


def build_proposer(
    routing: str, heads: list[DraftHead], spec: TreeSpec, **options: object
) -> Proposer:
    if routing not in BUILDERS:
        raise ValueError(f"routing={routing!r} is not implemented; choose one of {STRATEGIES}")
    build = BUILDERS[routing]
    known = set(inspect.signature(build).parameters) - {"heads", "spec"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"routing={routing} has no option(s) {', '.join(f'routing.{k}' for k in unknown)}; "
            f"it takes {sorted(known) or 'none'}"
        )
    return build(heads, spec, **options)
