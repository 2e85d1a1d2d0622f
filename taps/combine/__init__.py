"""Strategies that turn one or more draft heads into a `Proposer` for the shared engine.

Each strategy is one module with `build(heads, spec, **options)`, registered in STRATEGIES.
conf/routing/<option>.yaml targets a `build` with `_partial_: true`: Hydra binds the options
(an unknown one fails naming the key), the run supplies the heads and the tree later."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from taps.combine import average, bandit, confidence, entropy, hedge, merged, single
from taps.engine.decoder import Proposer
from taps.engine.drafting import TreeSpec
from taps.models.heads import AnyHead

Build = Callable[..., Proposer]
STRATEGIES: dict[str, Build] = {
    "single": single.build,
    "average": average.build,
    "confidence": confidence.build,
    "entropy": entropy.build,
    "merged_tree": merged.build,
    "hedge": hedge.build,
    "bandit": bandit.build,
}
# Strategies whose tree choice never looks at the current draws, so drawn (sampled) trees stay
# lossless; confidence and entropy routing pick among drawn trees by what was drawn, which
# biases the draws verification sees, and merging mixes two draft distributions at a node.
DRAW_SAFE = {"single", "average", "hedge", "bandit"}
# The option that tells a strategy's variants apart in display labels: average(0.5).
_LABEL_OPTION = {"average": "alpha", "merged_tree": "budget", "bandit": "algorithm"}


@dataclass(frozen=True)
class Strategy:
    """A registered strategy with its options bound: call it with the heads and the tree."""

    name: str
    options: dict
    build: Build

    @property
    def combines(self) -> bool:
        """True for strategies of several drafters (one per mixture component by default)."""
        return self.name != "single"

    @property
    def label(self) -> str:
        key = _LABEL_OPTION.get(self.name)
        return self.name if key is None else f"{self.name}({self.options.get(key)})"

    def __call__(self, heads: list[AnyHead], spec: TreeSpec) -> Proposer:
        check_sampled(self.name, spec)
        return self.build(heads, spec, **self.options)


def check_sampled(name: str, spec: TreeSpec) -> None:
    """Refuse drawn trees under a strategy that would make them lossy (see DRAW_SAFE)."""
    if spec.sampled and name not in DRAW_SAFE:
        raise ValueError(
            f"tree.sampled=true with routing={name}: this strategy chooses or merges trees by "
            f"their random draws, which would bias sampling; use it with {sorted(DRAW_SAFE)}"
        )


def strategy(factory: Callable[..., Proposer]) -> Strategy:
    """The Strategy a routing config instantiated to (a partial of a registered `build`)."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    options = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    if isinstance(factory, functools.partial) and factory.args:
        raise ValueError(f"routing: {func.__module__} takes options by name, got {factory.args}")
    names = {f: n for n, f in STRATEGIES.items()}
    if func not in names:
        raise ValueError(
            f"routing._target_={func.__module__}.{func.__qualname__} is not a registered "
            f"strategy; register it in taps/combine/__init__.py (known: {list(STRATEGIES)})"
        )
    try:  # a misspelt option fails here, before any drafter is trained, not at the first call
        inspect.signature(func).bind_partial(None, None, **options)
    except TypeError as e:
        raise TypeError(f"routing={names[func]}: {e} (options: {sorted(options)})") from None
    return Strategy(names[func], options, func)


def build_proposer(name: str, heads: list[AnyHead], spec: TreeSpec, **options: object) -> Proposer:
    """For code without a config: STRATEGIES[name] with its options (unknown: TypeError)."""
    if name not in STRATEGIES:
        raise ValueError(f"routing={name!r} is not implemented; choose one of {list(STRATEGIES)}")
    check_sampled(name, spec)
    return STRATEGIES[name](heads, spec, **options)
