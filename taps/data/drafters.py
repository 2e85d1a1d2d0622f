"""Which data each drafter of a run is trained on. A single drafter trains on `data` (its
components mixed into one training set); a strategy that combines drafters gets one per
component of `data`, each trained on the data config of the component's name, composed by
Hydra as `data=<name>` would compose it and given the mixture's shared settings (budget,
max_len, ...), so it is the very drafter, and cache entry, that `data=<name>` trains. A
component of the user's own data (source jsonl or hf) is a data config of its own."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from taps.config import compose_option
from taps.data.user import USER_SOURCES, component_label

_OWN = ("name", "components")  # the keys of a data config that are not shared settings


def drafter_data(
    data: DictConfig, names: Sequence | None = None, combines: bool = False
) -> list[DictConfig]:
    """One data config per drafter. `names` (the run's `drafters` key) lists data config
    names or inline data configs (mappings with name and components); None means `data`
    itself for a single drafter, one per component of `data` for a combination."""
    if names is None:
        if not combines:
            return [data]
        names = [_of_component(c) for c in data.components]
    if isinstance(names, str) or not isinstance(names, Sequence | ListConfig):
        raise ValueError(f"drafters={names!r}: expected a list of data config names")
    shared = {k: v for k, v in OmegaConf.to_container(data, resolve=True).items() if k not in _OWN}
    return [OmegaConf.merge(_base(entry), shared) for entry in names]


def _of_component(comp: DictConfig) -> str | dict:
    """A built-in source names its data config; the user's own data (jsonl, hf) is its own."""
    if comp.source in USER_SOURCES:
        plain = OmegaConf.to_container(comp, resolve=True)
        return {"name": component_label(plain), "components": [plain]}
    return str(comp.source)


def _base(entry: object) -> DictConfig:
    if isinstance(entry, str):
        try:
            return compose_option("data", entry)
        except ValueError as e:
            raise ValueError(
                f"drafters: {e} (one drafter per mixture component needs conf/data/<name>.yaml)"
            ) from None
    plain = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
    if not isinstance(plain, dict) or not all(k in plain for k in _OWN):
        raise ValueError(f"drafters: inline entry {entry} needs name and components")
    return OmegaConf.create(plain)
