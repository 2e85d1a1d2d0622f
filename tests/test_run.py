"""The Hydra entry point on the tiny target: configs compose, bad overrides fail clearly, and a
run writes results.json / csv / md / heatmap that agree, plus an offline W&B run."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

from taps.combine import strategy
from taps.config import CONF_DIR
from taps.data.drafters import drafter_data
from taps.engine.drafting import TreeSpec
from taps.run import run

TINY = [
    "target=tiny_random",
    "data.components=[{source: mathinstruct, examples: 24}, {source: sharegpt, examples: 6}]",
    "data.max_len=128",
    "trainer.max_epochs=1",
    "bench.limit=2",
    "max_new_tokens=12",
]


def cfg_with(overrides: list[str], tmp_path: Path, own_drafters: bool = False):
    """The composed config writing to tmp_path; `own_drafters`: a private drafter cache (the
    shared converted target kept), so the run trains its drafters itself."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        if "dir" in cfg.logger:
            cfg.logger.dir = str(tmp_path)
        if own_drafters:
            cfg.target.cache_dir = cfg.paths.cache_dir
            cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_defaults_compose(tmp_path):
    cfg = cfg_with([], tmp_path)
    assert cfg.target._target_.endswith("load_smollm2")
    assert cfg.bench.benchmarks == ["mt_bench", "gsm8k", "math500", "svamp"]
    assert Path(cfg.paths.data_dir).is_dir()


def test_unknown_key_fails(tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_new_tokenz"):
        cfg_with(["max_new_tokenz=3"], tmp_path)


def test_unknown_group_option_fails(tmp_path):
    with pytest.raises(ConfigCompositionException, match="target"):
        cfg_with(["target=gpt5"], tmp_path)


def test_tiny_run_writes_agreeing_results(tmp_path):
    cfg = cfg_with(
        [*TINY, "logger=wandb", "eval.verify_lossless=true", "temperature=[0,1]",
         "data.holdout=0.2", "trainer.log_every_n_steps=1"],
        tmp_path,
        own_drafters=True,
    )  # fmt: skip
    out = run(cfg, tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 8  # 4 benchmarks x 2 temperatures
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    md = (tmp_path / "results.md").read_text()
    for r, c in zip(rows, csv_rows, strict=True):
        assert c["bench"] == r["bench"] and abs(float(c["tau"]) - r["tau"]) < 1e-9
        assert f"{r['tau']:.2f}" in md
        assert r["tau"] == pytest.approx(r["new_tokens"] / r["target_forwards"], abs=1e-4)
    for r in rows:
        if r["temperature"] == 0:
            assert r["lossless"]["identical_fraction"] == 1.0
    mt = next(r for r in rows if r["bench"] == "mt_bench")
    assert mt["turns"] == 2 * mt["prompts"]
    texts = [json.loads(x) for x in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert len(texts) == sum(r["turns"] for r in rows)  # one line per prompt and turn
    first = texts[0]
    assert first["turn"] == 1 and first["prompt"] and first["tokens"] and "text" in first
    assert all(o["identical_to_vanilla"] for o in texts if o["temperature"] == 0)
    assert all(o["identical_to_vanilla"] is None for o in texts if o["temperature"] == 1)
    assert (tmp_path / "tau_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "acceptance_by_depth.png").stat().st_size > 1000
    assert out["paths"]["json"] == tmp_path / "results.json"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].rglob("*"))
    assert any(p.name.endswith(".wandb") for p in files)
    assert any("tau_grid" in p.name and p.suffix == ".json" for p in files)
    assert any("tau_heatmap" in p.name and p.suffix == ".png" for p in files)
    # Training curves reach the same W&B run: held-out rollout metrics included.
    keys = (b"val/top1_d1", b"val/top1_d5", b"val/sim_tau", b"val/token_loss", b"train/loss")
    for _ in range(60):  # W&B's service process may still be writing the offline file
        blob = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
        if all(k in blob for k in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key in blob, key
    head_meta = doc["drafter"]
    by_source = head_meta["data"]["train_features"]["by_source"]  # offline math = gsm8k_train
    assert len(by_source) == 2 and "sharegpt" in by_source
    assert abs(sum(d["supervised_share"] for d in by_source.values()) - 1) < 1e-3


@pytest.mark.parametrize(
    "routing,label",
    [("single", "single"), ("average", "average(0.5)"), ("confidence", "confidence"),
     ("entropy", "entropy"), ("merged_tree", "merged_tree(full)"),
     ("merged_tree_matched", "merged_tree(matched)")],
)  # fmt: skip
def test_routing_configs_build_registered_strategies(tmp_path, routing, label):
    cfg = cfg_with([f"routing={routing}"], tmp_path)
    built = strategy(instantiate(cfg.routing))
    assert built.label == label and built.name == label.split("(")[0]
    assert built.combines == (routing != "single")


def test_tree_configs_build_tree_specs(tmp_path):
    for name, shape in (("chain", (1, 4, 6)), ("cpu", (4, 3, 8)), ("eagle2", (10, 5, 60))):
        spec = instantiate(cfg_with([f"tree={name}"], tmp_path).tree)
        assert isinstance(spec, TreeSpec) and spec.name == name
        assert (spec.top_k, spec.depth, spec.total_tokens) == shape


def test_misspelt_routing_or_tree_option_fails_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match="budgte"):
        cfg_with(["routing=merged_tree", "routing.budgte=matched"], tmp_path)
    cfg = cfg_with(["routing=merged_tree", "+routing.budgte=matched"], tmp_path)
    with pytest.raises(TypeError, match="budgte"):
        strategy(instantiate(cfg.routing))
    cfg = cfg_with(["+tree.widht=3"], tmp_path)
    with pytest.raises(InstantiationException, match="widht"):
        instantiate(cfg.tree)
    with pytest.raises(ValueError, match="not a registered strategy"):
        strategy(instantiate({"_target_": "taps.combine.group.split_budget", "_partial_": True}))


def test_component_drafters_follow_the_mixture(tmp_path):
    """data=mix routing=confidence: one drafter per component, each the drafter data=<name>
    would train (so the cache is shared), with the mixture's budget and max_len."""
    cfg = cfg_with(["routing=confidence", "data.budget=paper", "data.max_len=1024"], tmp_path)
    comps = drafter_data(cfg.data, cfg.drafters, combines=True)
    assert [c.name for c in comps] == ["mathinstruct", "sharegpt"]
    assert all(c.budget == "paper" and c.max_len == 1024 for c in comps)
    assert comps[0].components[0].examples.paper == 70000  # the single-domain size, not 35k
    plain = cfg_with(["data=mathinstruct"], tmp_path)
    mixed = cfg_with([], tmp_path).data
    assert drafter_data(mixed, None, combines=True)[0] == plain.data
    assert drafter_data(mixed, None, combines=False) == [mixed]  # routing=single: data itself
    with pytest.raises(ValueError, match="drafters: no config data=nosuch"):
        drafter_data(mixed, ["nosuch", "sharegpt"], combines=True)


def test_data_configs_share_their_base_through_defaults(tmp_path):
    """Every data option composes conf/data/_base.yaml; its own keys win."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(Path(CONF_DIR) / "data" / "_base.yaml")
    for name in ("mathinstruct", "sharegpt", "mix", "mix_large"):
        data = cfg_with([f"data={name}"], tmp_path).data
        assert data.name == name and len(data.components) >= 1
        assert all(data[k] == v for k, v in base.items())
    assert cfg_with(["data=mix", "data.max_len=64"], tmp_path).data.max_len == 64


TINY_DRAFTERS = (
    "drafters=[{name: m, components: [{source: mathinstruct, examples: 20}]},"
    " {name: s, components: [{source: sharegpt, examples: 6}]}]"
)


def test_tiny_confidence_run_reports_routing(tmp_path):
    cfg = cfg_with(
        [*TINY, "routing=confidence", TINY_DRAFTERS, "logger=none", "tree=eagle2",
         "eval.verify_lossless=true", "bench.benchmarks=[gsm8k,mt_bench]"],
        tmp_path,
        own_drafters=True,
    )  # fmt: skip
    out = run(cfg, tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["drafters"]) == {"m", "s"} and doc["drafter"] is None
    for r in doc["rows"]:
        assert r["variant"] == "eagle2/mix/confidence" and r["drafters"] == ["m", "s"]
        assert r["strategy"] == "confidence" and r["options"] == {}
        shares = r["routing_shares"]
        assert set(shares["cycles"]) == {"m", "s"}
        assert sum(shares["cycles"].values()) == pytest.approx(1, abs=1e-3)
        assert sum(shares["questions"].values()) == pytest.approx(1, abs=1e-3)
        lo, hi = r["tau_ci95"]
        assert lo <= r["tau"] <= hi
        assert r["lossless"]["identical_fraction"] == 1.0
        assert r["draft_forwards_per_cycle"] == 2 * (1 + cfg.tree.depth)
    assert out["paths"]["routing"].stat().st_size > 1000


def test_sweep_jobs_share_the_target_but_not_its_serving_cast(tmp_path):
    import torch

    from taps.models.target import shared_target

    cfg = cfg_with([*TINY, "logger=none"], tmp_path)
    first = shared_target(cfg.target)
    assert shared_target(cfg.target) is first  # the next job of a multirun reuses the model
    loaded = first.model.lm_head.weight.dtype
    first.model.to(torch.bfloat16)  # what eval.dtype=bfloat16 does to serve
    again = shared_target(cfg.target)
    assert again is not first and again.model.lm_head.weight.dtype == loaded


@pytest.mark.parametrize(
    "override,key",
    [("temperature=abc", "temperature='abc'"), ("temperature=-1", "temperature=-1"),
     ("temperature=[0,-0.5]", "temperature="), ("top_p=1.5", "top_p=1.5"), ("top_p=0", "top_p=0"),
     ("max_new_tokens=0", "max_new_tokens=0"), ("max_new_tokens=abc", "max_new_tokens='abc'"),
     ("bench.limit=abc", "bench.limit='abc'"), ("bench.limit=0", "bench.limit=0"),
     ("tree.top_k=0", "tree.top_k=0"), ("tree.depth=x", "tree.depth='x'"),
     ("eval.dtype=fp8", "eval.dtype='fp8'"), ("bench=jsonl", "bench.path is missing"),
     ("drafter=eagle_pretrained", "drafter.path is missing")],
)  # fmt: skip
def test_bad_settings_fail_before_anything_is_loaded(tmp_path, monkeypatch, override, key):
    """Named key and value, in the first second: nothing loaded, trained or written."""
    import taps.models.target as target_mod
    from taps.settings import SettingsError

    def must_not_load(*a, **k):
        raise AssertionError("loaded the target before validating the settings")

    monkeypatch.setattr(target_mod, "shared_target", must_not_load)
    cfg = cfg_with([*TINY, "logger=none", override], tmp_path)
    with pytest.raises(SettingsError, match=re.escape(key)):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompt_file_is_an_error(tmp_path, content):
    from taps.data.conversations import DataError

    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    cfg = cfg_with([*TINY, "logger=none", "bench=jsonl", f"bench.path={f}"], tmp_path)
    with pytest.raises(DataError, match="no prompt"):
        run(cfg, tmp_path)


def test_a_directory_as_prompt_file_is_named(tmp_path):
    from taps.settings import SettingsError

    cfg = cfg_with([*TINY, "logger=none", "bench=jsonl", f"bench.path={tmp_path}"], tmp_path)
    with pytest.raises(SettingsError, match="a directory"):
        run(cfg, tmp_path)


def test_a_drafter_on_the_users_jsonl_composes_with_confidence_routing(tmp_path):
    """Issue 18: a user's JSONL file (both record formats) trains one drafter, combined with the
    built-in math drafter by confidence routing, end to end on the tiny target."""
    from tests.test_data_user import write_user_file

    mine = tmp_path / "mine.jsonl"
    write_user_file(mine)
    components = (f"data.components=[{{source: jsonl, path: '{mine}', examples: 30}},"
                  " {source: mathinstruct, examples: 12}]")  # fmt: skip
    cfg = cfg_with(["target=tiny_random", components, "data.max_len=128", "trainer.max_epochs=1",
                    "bench.limit=1", "max_new_tokens=8", "routing=confidence", "logger=none",
                    "bench.benchmarks=[gsm8k]", "eval.verify_lossless=true"], tmp_path,
                   own_drafters=True)  # fmt: skip
    (row,) = run(cfg, tmp_path)["rows"]
    assert row["drafters"] == ["jsonl-mine", "mathinstruct"] and row["strategy"] == "confidence"
    assert set(row["routing_shares"]["cycles"]) == {"jsonl-mine", "mathinstruct"}
    assert row["lossless"]["identical_fraction"] == 1.0
    names = sorted(p.name.split("-")[1] for p in (tmp_path / "cache" / "drafters").iterdir())
    assert names == ["jsonl", "mathinstruct"]


def test_tiny_hedge_run_on_the_stream_reports_per_source_and_weights(tmp_path):
    """routing=hedge on bench=stream end to end: one row for the session and one per source,
    the weight trajectory with each cycle's source, the plot, vanilla speed beside ours."""
    cfg = cfg_with(
        [*TINY, "routing=hedge", TINY_DRAFTERS, "logger=none", "bench=stream", "bench.limit=1",
         "eval.verify_lossless=true", "bench.stream.mix.math500=0", "bench.stream.mix.svamp=0"],
        tmp_path,
        own_drafters=True,
    )  # fmt: skip
    out = run(cfg, tmp_path)
    rows = {r["bench"]: r for r in out["rows"]}
    assert set(rows) == {"stream", "stream/gsm8k", "stream/mt_bench"}
    whole, parts = rows["stream"], [rows["stream/gsm8k"], rows["stream/mt_bench"]]
    assert whole["turns"] == sum(p["turns"] for p in parts) == 3  # MT-Bench has 2 turns
    assert whole["new_tokens"] == sum(p["new_tokens"] for p in parts)
    assert whole["lossless"]["identical_fraction"] == 1.0 and whole["speedup_vs_vanilla"] > 0
    traj = whole["route_trajectory"]
    assert set(traj["source"]) <= {"gsm8k", "mt_bench"} and len(traj["scores"][0]) == 2
    assert out["paths"]["weights"].stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert "speed against vanilla decoding" in md and "stream/gsm8k" in md


def test_a_run_whose_greedy_output_leaves_vanilla_fails_after_writing(tmp_path, monkeypatch):
    """A divergence from vanilla greedy decoding that is not a near-tie is a wrong decoding
    path: the run writes its results (to look at) and then fails, naming the turn."""
    import taps.eval.evaluate as evaluate
    from taps.eval import grid
    from taps.eval.ties import LosslessError

    def clear_divergence(spec, ref, dtype, near_tie):
        return dict(identical=False, position=3, top2_gap=5.0, spec_top2_gap=0.0,
                    top1_logit=9.0, threshold=1e-5, dtype="float32", near_tie=False)  # fmt: skip

    monkeypatch.setattr(evaluate, "compare", clear_divergence)
    # decode afresh and keep the fake verdict out of the shared cache
    monkeypatch.setattr(grid, "load_cell", lambda *a, **k: None)
    monkeypatch.setattr(grid, "store_cell", lambda *a, **k: None)
    cfg = cfg_with([*TINY, "logger=none", "eval.verify_lossless=true", "bench=gsm8k",
                    "bench.limit=1"], tmp_path)  # fmt: skip
    with pytest.raises(LosslessError, match="gsm8k question '0' turn 1: token 3 differs"):
        run(cfg, tmp_path)
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["lossless"]["all_divergences_near_ties"] is False
    assert "0/1 turns (1 NOT a near-tie)" in (tmp_path / "results.md").read_text()
