"""Every option of every config group composes into the main config, and the parts built from
`_target_` nodes (strategies, trees, objectives, callbacks, loggers) instantiate, with tiny
settings and nothing trained or loaded (as lightning-hydra-template's test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from taps.combine import STRATEGIES, strategy
from taps.config import CONF_DIR
from taps.engine.drafting import TreeSpec
from taps.training.train import build_callbacks, build_objective

# Options that need values no default gives: their required keys.
REQUIRED = {("drafter", "eagle_pretrained"): ["drafter.path=/nonexistent"]}
# logger=wandb's dir interpolates the Hydra run dir, which only a running app has.
OUTSIDE_AN_APP = {("logger", "wandb"): ["logger.dir=/tmp/taps-test-configs"]}
NOT_OPTIONS = {("data", "_base")}  # included through defaults lists, not selected


def options() -> list[tuple[str, str]]:
    out = []
    for group in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra"):
        for f in sorted(group.glob("*.yaml")):
            if (group.name, f.stem) not in NOT_OPTIONS:
                out.append((group.name, f.stem))
    return out


def compose_main(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_every_group_is_listed():
    groups = {g for g, _ in options()}
    assert {"routing", "tree", "data", "drafter", "callbacks", "trainer", "logger"} <= groups


@pytest.mark.parametrize("group,option", options())
def test_every_option_composes(group, option):
    logger = [] if group == "logger" else ["logger=none"]
    extra = REQUIRED.get((group, option), []) + OUTSIDE_AN_APP.get((group, option), [])
    cfg = compose_main([f"{group}={option}", *logger, *extra])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "experiment" or group == "scale":
        return
    assert group in cfg


@pytest.mark.parametrize("option", [o for g, o in options() if g == "routing"])
def test_every_routing_builds_a_registered_strategy(option):
    built = strategy(instantiate(compose_main([f"routing={option}"]).routing))
    assert built.name in STRATEGIES


@pytest.mark.parametrize("option", [o for g, o in options() if g == "tree"])
def test_every_tree_builds_a_tree_spec(option):
    spec = instantiate(compose_main([f"tree={option}"]).tree)
    assert isinstance(spec, TreeSpec) and spec.name == option


@pytest.mark.parametrize("option", ["eagle2", "hass"])
def test_every_trainable_drafter_builds_its_objective(option):
    objective = build_objective(compose_main([f"drafter={option}"]).drafter)
    assert callable(objective)


@pytest.mark.parametrize("option", [o for g, o in options() if g == "callbacks"])
def test_every_callbacks_option_builds(option):
    assert isinstance(build_callbacks(compose_main([f"callbacks={option}"]).callbacks), list)


def test_the_null_logger_builds(tmp_path):
    logger = instantiate(compose_main(["logger=none"]).logger)
    logger.start({})
    logger.finish()
    assert logger.run_dir is None
