"""OmegaConf resolvers used by conf/ (imported before Hydra composes anything)."""

from __future__ import annotations

from omegaconf import OmegaConf

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
