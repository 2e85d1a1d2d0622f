"""The speed harness (taps/study/speed.py) and peak-memory probe: what they measure and how they
summarise it. No timing assertions: speed claims come from experiments/, not from tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from taps.config import CONF_DIR
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead
from taps.study import speed
from tests.helpers import experiment_script


def test_peak_memory_sees_a_transient_allocation():
    """In a fresh process: inside a long test session freed memory stays resident and is
    reused, so a new block need not raise the RSS at all."""
    code = (
        "import time, torch\nfrom taps.memory import PeakMemory\n"
        "with PeakMemory('cpu', interval_s=0.001) as m:\n"
        "    x = torch.ones(16 * 2**20)\n    x += 1\n    time.sleep(0.2)\n    del x\n"
        "print(m.extra_mb, m.peak_mb, m.as_dict()['kind'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra, peak, kind = out.stdout.split()
    assert float(extra) >= 48 and float(peak) >= float(extra) and kind == "cpu_rss", out.stdout


def test_measure_and_summarise_on_a_tiny_target(tiny64):
    torch.manual_seed(0)
    model, eos = tiny64.model, set()
    head = DraftHead.for_target(model)
    dec = SpeculativeDecoder(model, HeadDrafter(head, TreeSpec(2, 2, 6)), eos)
    methods = speed.our_methods(model, {"ours_spec_single": dec}, eos, 0.0)
    prompts = [[5, 9, 13, 4], [7, 7, 21]]
    records = speed.measure(prompts, methods, 12, seed=0, device=torch.device("cpu"))
    assert [r["prompt"] for r in records] == [0, 1]
    for r, p in zip(records, prompts, strict=True):
        ref = vanilla_generate(model, p, 12, eos).tokens
        assert r["ours_vanilla"]["tokens"] == ref == r["ours_spec_single"]["tokens"]
        phases = r["ours_spec_single"]["phase_s"]
        assert {"prefill", "draft", "verify", "accept"} <= set(phases)
        assert sum(phases.values()) <= r["ours_spec_single"]["s"] + 1e-3
    s = speed.speed_summary(records, 0.0, dtype=torch.float32)
    van, spec = s["methods"]["ours_vanilla"], s["methods"]["ours_spec_single"]
    assert spec["near_ties_vs_ours_vanilla"] == spec["not_near_ties_vs_ours_vanilla"] == 0
    assert van["vs_ours_vanilla"] == 1.0 and "tau" not in van
    assert spec["tau"] >= 1.0 and set(spec["ms_per_cycle"]) >= {"draft", "verify", "accept"}
    assert "vs_hf_generate" not in spec  # no baseline (a) in this run: no ratio invented
    costs = speed.unit_costs(dec, prompts[0], reps=2)
    assert costs["tree_tokens"] <= 6 and min(costs["step_s"], costs["verify_s"]) > 0


@pytest.mark.parametrize("decoded_at,timed_at", [(0.0, 1.0), (1.0, 0.0)])
def test_unit_costs_time_the_tree_of_the_runs_temperature(tiny64, decoded_at, timed_at):
    """A drawn tree is drafted only at T > 0: the cost estimate must time the tree the run
    decodes with, not the one of whatever temperature the drafter decoded at last."""
    torch.manual_seed(0)
    model = tiny64.model
    drafter = HeadDrafter(DraftHead.for_target(model), TreeSpec(3, 2, 6, sampled=True))
    dec = SpeculativeDecoder(model, drafter, set())
    dec.generate(
        [5, 9, 13, 4], 8, temperature=decoded_at, generator=torch.Generator().manual_seed(0)
    )
    drawn, real = [], drafter._propose_sampled
    drafter._propose_sampled = lambda: drawn.append(1) or real()  # type: ignore[method-assign]
    costs = speed.unit_costs(dec, [5, 9, 13, 4], timed_at, reps=2)
    assert bool(drawn) == (timed_at > 0) and costs["verify_s"] > 0


def test_summarise_medians_of_per_prompt_ratios():
    def rec(a_s: float, b_s: float) -> dict:
        mem = {"kind": "cpu_rss", "peak_mb": 1.0, "extra_mb": 0.0}
        return {
            "hf_generate": {"tokens": [1] * 10, "s": a_s, "tau": None, "memory": mem},
            "ours_vanilla": {"tokens": [1] * 10, "s": b_s, "tau": None, "memory": mem},
        }

    s = speed.speed_summary([rec(1.0, 0.5), rec(2.0, 0.5), rec(1.0, 1.0)], 0.0)["methods"]
    # per prompt: vanilla is 2x, 4x and 1x as fast as generate -> median 2x
    assert s["ours_vanilla"]["vs_hf_generate"] == 2.0
    assert s["ours_vanilla"]["identical_to_hf_generate"] == 3
    assert s["hf_generate"]["tokens_per_s"] == 10.0


def test_paired_ratios_against_a_reference_method():
    mem = {"kind": "cpu_rss", "peak_mb": 1.0, "extra_mb": 0.0}

    def rec(**seconds: float) -> dict:
        return {
            n: {"tokens": [1] * 8, "s": s, "tau": None, "memory": mem} for n, s in seconds.items()
        }

    # a is 2x as fast as b on every prompt; against c it is 2x, 1x and 0.5x as fast.
    records = [rec(a=1.0, b=2.0, c=2.0), rec(a=2.0, b=4.0, c=2.0), rec(a=4.0, b=8.0, c=2.0)]
    paired = speed.speed_summary(records, 0.0, ref="a")["paired"]
    assert paired["ref"] == "a" and paired["prompts"] == 3 and set(paired["methods"]) == {"b", "c"}
    b, c = paired["methods"]["b"], paired["methods"]["c"]
    assert b == {"geo_mean": 2.0, "ci95": [2.0, 2.0], "median": 2.0, "faster_on": 3}
    assert c["geo_mean"] == 1.0 and c["median"] == 1.0 and c["faster_on"] == 1
    assert c["ci95"][0] < 1.0 < c["ci95"][1] and c["ci95"][0] >= 0.5 and c["ci95"][1] <= 2.0
    assert "paired" not in speed.speed_summary(records, 0.0)
    with pytest.raises(ValueError, match="speed.ref='d'"):
        speed.paired_ratios(records, "d")


def test_speed_presets_compose():
    """The scripts' primary configs: the main config with their experiment preset, a run dir
    of their own, and every speculative method naming a routing config."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("speed", return_hydra_config=True)
        sweep = compose("tree_sweep", return_hydra_config=True)
    assert cfg.tree.name == "cpu" and cfg.bench.benchmarks == ["gsm8k"]
    assert cfg.speed.methods[:3] == ["hf_generate", "hf_prompt_lookup", "ours_vanilla"]
    assert "/speed/" in cfg.hydra.run.dir
    routing = Path(CONF_DIR) / "routing"
    for r in cfg.speed.strategies.values():
        assert (routing / f"{r if isinstance(r, str) else r.routing}.yaml").is_file(), r
    assert sweep.data.name == "mathinstruct" and list(sweep.sweep.total_tokens)
    assert "/tree_sweep/" in sweep.hydra.run.dir


def test_speed_strategy_variants_change_only_what_they_name():
    """speed.strategies values: a routing option, or that option with settings changed, so two
    variants of one router can be timed side by side; a setting the option lacks is an error."""
    mod = experiment_script("speed")
    hedge = mod.routing_config("hedge", "hedge")
    variant = mod.routing_config(
        "drawn", OmegaConf.create({"routing": "hedge", "choose": "sample"})
    )
    assert hedge.choose == "argmax" and variant.choose == "sample"
    assert {k: v for k, v in variant.items() if k != "choose"} == {
        k: v for k, v in hedge.items() if k != "choose"
    }
    with pytest.raises(ValueError, match=r"drawn: routing=hedge has no setting \['chose'\]"):
        mod.routing_config("drawn", OmegaConf.create({"routing": "hedge", "chose": "argmax"}))
    with pytest.raises(ValueError, match="needs routing"):
        mod.routing_config("drawn", OmegaConf.create({"choose": "argmax"}))


def test_experiment_scripts_answer_help():
    """The override-driven scripts print their docstring for --help instead of a Hydra
    grammar error."""
    for script, first in (("speed.py", "Wall-clock speed"), ("tree_sweep.py", "Which draft tree")):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "experiments" / script), "--help"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith(first)


def test_greedy_divergences_from_vanilla_are_classified_and_a_clear_one_fails(tmp_path):
    """A speculative output that leaves our vanilla loop is a near-tie when the target's top-2
    logits were within the precision's noise there; otherwise the script exits 1 naming it."""
    mem = {"kind": "cpu_rss", "peak_mb": 1.0, "extra_mb": 0.0}

    def rec(i: int, spec_tokens: list[int], gap: float) -> dict:
        van = {"tokens": [1, 2, 3], "s": 1.0, "tau": None, "memory": mem,
               "top1_logits": [20.0] * 3, "top2_gaps": [3.0, gap, 3.0]}  # fmt: skip
        spec = {**van, "tokens": spec_tokens, "tau": 2.0, "cycles": 1, "phase_s": {}}
        return {"prompt": i, "question_id": f"q{i}", "ours_vanilla": van, "ours_spec_single": spec}

    records = [rec(0, [1, 2, 3], 3.0), rec(1, [1, 4, 3], 0.1), rec(2, [1, 4, 3], 2.0)]
    s = speed.speed_summary(records, 0.0, dtype=torch.bfloat16)["methods"]["ours_spec_single"]
    assert s["identical_to_ours_vanilla"] == 1  # bf16 at |top-1| 20: threshold 0.625
    assert s["near_ties_vs_ours_vanilla"] == 1 and s["not_near_ties_vs_ours_vanilla"] == 1
    (bad,) = s["divergences_not_near_ties"]
    assert bad["prompt"] == 2 and bad["position"] == 1 and bad["top2_gap"] == 2.0
    f32 = speed.speed_summary(records, 0.0, dtype=torch.float32)["methods"]["ours_spec_single"]
    assert f32["not_near_ties_vs_ours_vanilla"] == 2  # the same gaps are clear in float32
    script = experiment_script("speed")
    script.check_identity({"ours_spec_single": {**s, "divergences_not_near_ties": []}}, tmp_path)
    with pytest.raises(SystemExit, match=r"not near-ties.*'ours_spec_single': \[\('q2', 1, 2.0"):
        script.check_identity({"ours_spec_single": s}, tmp_path)
