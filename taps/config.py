"""The config directory, the OmegaConf resolvers conf/ uses (registered on import, before Hydra
composes anything), and composing one group option on its own."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from taps.paths import REPO_ROOT, default_cache_dir, default_data_dir

CONF_DIR = str(REPO_ROOT / "conf")


def register_resolvers() -> None:
    for name, fn in {
        "taps_data_dir": default_data_dir,
        "taps_cache_dir": default_cache_dir,
        "taps_repo": lambda: str(REPO_ROOT),
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose_option(group: str, option: str) -> DictConfig:
    """conf/<group>/<option>.yaml as the main config's `<group>` node would hold it, composed by
    Hydra (its defaults list applied), inside or outside a running Hydra app."""
    if not (Path(CONF_DIR) / group / f"{option}.yaml").is_file():
        raise ValueError(
            f"no config {group}={option}: {Path(CONF_DIR) / group} has no {option}.yaml"
        )
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name=f"{group}/{option}")
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=f"{group}/{option}")
    return cfg[group]
