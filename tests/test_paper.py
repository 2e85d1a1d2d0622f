"""The paper's study as one command: the study configs compose into the multiruns they name,
the GPU scale and DDP trainer compose, a two-job joblib multirun works here (each drafter
trained once under the lock, a re-run decodes nothing), and experiments/paper.py skips only
studies that are really up to date."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from taps.config import CONF_DIR
from taps.eval.cells import cell_key, load_cell, store_cell
from taps.eval.intervals import mean_difference_ci
from taps.paths import IntegrityError
from taps.report.rows import load_rows, rows_of
from taps.study.findings import Comparison, grade, grade_all
from taps.study.paper import STUDIES
from taps.study.variants import BENCHES
from tests.helpers import ROOT, experiment_script


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


@pytest.mark.parametrize("study", STUDIES)
def test_study_configs_are_multiruns_at_cpu_scale(study):
    cfg = _compose([f"experiment={study}"], hydra=True)
    params = cfg.hydra.sweeper.params
    assert params["temperature"] == "0.0,1.0"  # every study sweeps both temperatures
    assert cfg.data.budget == "tiny" and cfg.tree.name == "cpu" and cfg.bench.limit == 2
    assert cfg.logger.group == study
    for key, values in params.items():  # every swept option exists
        if key in ("drafter", "data", "routing"):
            for v in values.split(","):
                assert (Path(CONF_DIR) / key / f"{v}.yaml").is_file(), (key, v)


def test_paper_gpu_scale_has_the_papers_sizes():
    cfg = _compose(["experiment=specialization", "scale=paper_gpu"])
    assert cfg.target.name == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.data.budget == "paper" and cfg.data.max_len == 1024
    assert cfg.trainer.max_epochs == 20 and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.tree.top_k, cfg.tree.depth, cfg.tree.total_tokens) == (10, 5, 60)
    assert cfg.bench.limit is None and cfg.drafter.draft_vocab is None
    single = _compose(["experiment=paper_gpu"])  # the single-run preset shares the scale
    assert single.data.budget == "paper" and single.trainer.max_epochs == 20


def test_ddp_trainer_builds_a_ddp_strategy():
    cfg = _compose(["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    # The same config on CPUs (gloo): the Trainer must accept it (no GPU here to fit on).
    kw = {k: v for k, v in cfg.trainer.items() if k != "checkpoint_every"}
    trainer = instantiate({**kw, "accelerator": "cpu", "devices": 2, "precision": "32-true"})
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.world_size == 2


TINY = [
    "target=tiny_random",
    "data.components=[{source: mathinstruct, examples: 16}]",
    "data.max_len=96",
    "trainer.max_epochs=1",
    "bench.limit=1",
    "bench.benchmarks=[gsm8k,mt_bench]",
    "max_new_tokens=6",
    "logger=none",
]


def test_two_job_joblib_multirun(tmp_path):
    env = {**os.environ, "TAPS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "taps.run", "-m", "hydra/launcher=parallel", *TINY,
           "temperature=0.0,1.0", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "joblib" in first.stderr + first.stdout.lower()
    docs = [json.loads((tmp_path / "sweep" / j / "results.json").read_text()) for j in "01"]
    assert [d["config"]["temperature"] for d in docs] == [0.0, 1.0]
    assert {d["drafter"]["key"] for d in docs} == {docs[0]["drafter"]["key"]}
    heads = list((tmp_path / "cache" / "drafters").glob("*/head.safetensors"))
    assert len(heads) == 1  # both jobs needed it: trained once, under the lock
    assert len(list((tmp_path / "cache" / "cells").glob("*.json"))) == 4
    stamp = (tmp_path / "sweep" / "0" / "results.json").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("[cached]") == 4 and "nothing logged" in log
    assert (tmp_path / "sweep" / "0" / "results.json").stat().st_mtime_ns == stamp


def test_cell_keys_and_unreadable_cells(tmp_path):
    base = {"target": "t", "bench": "gsm8k", "temperature": 0.0, "max_new_tokens": 8}
    key = cell_key(**base)
    assert key == cell_key(**dict(reversed(base.items())))
    for change in ({"temperature": 1.0}, {"max_new_tokens": 9}, {"bench": "svamp"}):
        assert cell_key(**{**base, **change}) != key
    assert load_cell(tmp_path, key) is None
    store_cell(tmp_path, key, {"tau": 2.0}, base, [{"text": "4"}])
    assert load_cell(tmp_path, key) == ({"tau": 2.0}, [{"text": "4"}])
    path = tmp_path / "cells" / f"{key}.json"
    path.write_text(path.read_text().replace('"tau": 2.0', '"tau": 4.0'))  # an edited result
    with pytest.raises(IntegrityError, match=f"{key}.json: cached result cell changed"):
        load_cell(tmp_path, key)  # never served, never silently decoded over
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match=f"{key}.json: cached result cell unreadable"):
        load_cell(tmp_path, key)


def test_cells_are_keyed_by_the_machine_that_timed_them(monkeypatch):
    """A cell's tokens/s were measured: timed with other linear kernels, another thread count
    or another processor, it is decoded again instead of served."""
    import torch

    from taps.eval import grid

    cpu = torch.device("cpu")
    here = grid.machine(cpu)
    assert here["device"] and here["threads"] == torch.get_num_threads()
    monkeypatch.setenv("TAPS_ONEDNN", "0")
    off = grid.machine(cpu)
    assert off["onednn"] is False
    assert here["onednn"] is False or cell_key(machine=off) != cell_key(machine=here)
    monkeypatch.setattr(grid, "cpu_name", lambda: "another processor")
    assert cell_key(machine=grid.machine(cpu)) != cell_key(machine=off)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cell_key(machine=grid.machine(cpu)) != cell_key(machine=off)
    finally:
        torch.set_num_threads(threads)


def test_paper_script_skips_only_what_is_up_to_date(tmp_path):
    paper = experiment_script("paper")
    cache, out = tmp_path / "cache", tmp_path / "out"
    study = out / "runs" / "depth"
    (study / "0").mkdir(parents=True)
    row = {"cell": "abc", "strategy": "single", "options": {}}
    (study / "0" / "results.json").write_text(json.dumps({"schema_version": 2, "rows": [row]}))
    store_cell(cache, "abc", {"tau": 1.5}, {})
    stamp = paper.fingerprint(["bench.limit=2"], "")
    assert not paper.up_to_date(study, stamp, cache)  # never finished
    (study / "done.json").write_text(json.dumps({"fingerprint": stamp}))
    assert paper.up_to_date(study, stamp, cache)
    assert not paper.up_to_date(study, paper.fingerprint(["bench.limit=3"], ""), cache)
    import torch

    threads = torch.get_num_threads()
    try:  # timed on another machine (here: another thread count): run it again
        torch.set_num_threads(threads + 1)
        assert not paper.up_to_date(study, paper.fingerprint(["bench.limit=2"], ""), cache)
    finally:
        torch.set_num_threads(threads)
    (cache / "cells" / "abc.json").unlink()
    assert not paper.up_to_date(study, stamp, cache)  # a cited cell is gone: run it again


def test_ddp_training_on_two_cpu_processes(tmp_path):
    """trainer=ddp really trains across 2 processes (gloo on CPU): the extra rank re-runs the
    command, skips the lock rank 0 holds, helps fit and exits; rank 0 saves and evaluates."""
    env = {**os.environ, "TAPS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "taps.run", *TINY, "data.max_len=256", "trainer=ddp",
           "data.components=[{source: mathinstruct, examples: 32}]", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "bench.benchmarks=[gsm8k]",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["drafter"]["trainer"]["strategy"] == "ddp"
    assert len(list((tmp_path / "cache" / "drafters").glob("*/head.safetensors"))) == 1
    log = (
        proc.stdout
        + proc.stderr
        + "".join(f.read_text() for f in (tmp_path / "run").glob("train_ddp_process_*.log"))
    )
    assert "Starting with 2 processes" in log and "Error" not in log
    # 30 examples, batch 4: 8 batches an epoch, 4 on each rank, so 4 optimizer steps.
    assert doc["drafter"]["global_step"] == 4


FIXTURE = ROOT / "tests" / "data" / "paper"  # results of a real `make paper` (README there)


def test_report_regenerates_from_stored_results(tmp_path):
    """The committed report.md is exactly what the report builder makes of the committed
    results.json files and wall-time log, figures included."""
    from taps.study.figures import FIGURES
    from taps.study.paper import write_report

    shutil.copytree(FIXTURE / "runs", tmp_path / "runs")
    history = json.loads((FIXTURE / "timing.json").read_text())
    path = write_report(tmp_path, history)
    assert path.read_text() == (FIXTURE / "report.md").read_text()
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").stat().st_size > 5000, name
        assert f"]({name}.png)" in path.read_text()


def test_report_tables_agree_with_the_results():
    """Every tau in the report's tables is the tau of the matching results.json row, and the
    average is the mean of the four benchmarks."""
    from taps.study.paper import study_rows
    from taps.study.variants import KINDS, VARIANTS, select

    studies = {s: study_rows(FIXTURE, s) for s in STUDIES}
    report = (FIXTURE / "report.md").read_text()
    checked = 0
    for block in report.split("## Acceptance length tau")[1].split("\n### ")[1:]:
        head, *lines = block.splitlines()
        kind_name, temp = head.split(", T=")
        kind = next(k for k, v in KINDS.items() if v == kind_name)
        for line in lines:
            cells = [c.strip() for c in line.strip("|").split("|")]
            variant = next((v for v in VARIANTS if v.title == cells[0]), None)
            if variant is None:
                continue
            rows = select(studies[variant.study], variant, kind, float(temp))
            taus = [rows[b]["tau"] for b in BENCHES]
            for b, cell, tau in zip(BENCHES, cells[1:5], taus, strict=True):
                assert float(cell.split()[0]) == pytest.approx(tau, abs=0.005), (head, b)
            assert float(cells[5].split()[0]) == pytest.approx(sum(taus) / 4, abs=0.005)
            checked += 1
    assert checked == 4 * len(VARIANTS)  # every variant, both kinds, both temperatures


@pytest.mark.parametrize("launcher,target", [("parallel", "joblib"), ("slurm", "submitit")])
def test_launcher_configs_compose(launcher, target):
    cfg = _compose([f"hydra/launcher={launcher}", "experiment=depth"], hydra=True)
    assert target in cfg.hydra.launcher._target_.lower()
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min > 0


def _rows(per_bench: dict[str, dict[str, list[int]]]) -> list[dict]:
    out = []
    for bench, pq in per_bench.items():
        tok, fwd = (sum(v[i] for v in pq.values()) for i in (0, 1))
        out.append({"bench": bench, "tau": tok / fwd, "per_question": pq})
    return out


def test_paired_difference_interval():
    """The paired interval is zero-width for identical variants, excludes zero when one variant
    is better on every question, and is withheld when the questions differ."""
    base = {"gsm8k": {str(q): [100, 50 + 5 * q] for q in range(8)},
            "mt_bench": {str(q): [200, 150 - 7 * q] for q in range(8)}}  # fmt: skip
    better = {b: {q: [t, f - 5] for q, (t, f) in pq.items()} for b, pq in base.items()}
    d, ci = mean_difference_ci(_rows(base), _rows(base))
    assert d == 0 and ci == (0.0, 0.0)
    d, ci = mean_difference_ci(_rows(better), _rows(base))
    assert d > 0 and ci is not None and 0 < ci[0] <= d <= ci[1]
    # Pairing cancels the large spread between questions, so the interval stays narrow.
    assert ci[1] - ci[0] < 0.5 * d
    other = {b: {f"x{q}": v for q, v in pq.items()} for b, pq in base.items()}
    assert mean_difference_ci(_rows(other), _rows(base))[1] is None
    with pytest.raises(ValueError, match="share no benchmark"):
        mean_difference_ci(_rows({"svamp": base["gsm8k"]}), _rows(base))


def test_combination_table_on_stored_results(tmp_path):
    """experiments/combination_table.py on a real run's rows: every finding per drafter kind and
    temperature (from taps.study.findings), finding 4 against the combination's components only
    (not the drafter trained on the mixture), differences equal to the rows' own means, and the
    figure written."""
    mod = experiment_script("combination_table")
    rows = load_rows(*(FIXTURE / "runs" / s for s in ("combination", "specialization")))
    text = mod.findings(rows)
    for kind in ("EAGLE-2", "HASS"):
        for temp in ("0", "1"):
            start = text.index(f"- {kind}, T={temp}, mean tau:")
            block = text[start:].split("\n- ")[0]
            for finding in "123456":  # per kind and temperature, never pooled across them
                assert f"\n  - {finding} **" in block, (kind, temp, finding)
            four = next(x for x in block.splitlines() if x.startswith("  - 4 "))
            assert len(re.findall(r"confidence \d\.\d\d - ", four)) == 2  # the two parts
            assert "- math " in four and "- ShareGPT " in four and "- mix" not in four
    assert "- HASS, 2b (across temperatures) **" in text
    pick = {(r["variant"], r["bench"]): r["tau"] for r in rows if r["temperature"] == 0.0}
    conf, share = "eagle2/mix/confidence", "eagle2/sharegpt"
    want = sum(pick[conf, b] - pick[share, b] for b in BENCHES) / len(BENCHES)
    block = text[text.index("- EAGLE-2, T=0,") :].split("\n- ")[0]
    diff = re.escape(f"{want:+.2f}")
    assert re.search(rf"confidence \d\.\d\d - ShareGPT \d\.\d\d: {diff} \[", block)
    mod.tau_bars(rows, tmp_path / "tau.png")
    assert (tmp_path / "tau.png").stat().st_size > 10_000


GRID = ROOT / "experiments" / "results" / "combination_grid_cpu"


def test_stored_combination_grid_regenerates_its_table_and_the_readme_quotes_it():
    """Issue 5's measured grid: its rows give exactly the stored table.md, and every
    tau-with-interval cell in experiments/README's acceptance-grid section appears in it."""
    mod = experiment_script("combination_table")
    rows = load_rows(GRID)
    assert len(rows) == 7 * 2 * 4  # variants x temperatures x benchmarks
    text = mod.report(rows)
    assert text == (GRID / "table.md").read_text()
    doc = (ROOT / "experiments" / "README.md").read_text()
    section = doc.split("### The acceptance grid")[1].split("\n## ")[0]
    cells = re.findall(r"\| (?:\*\*)?(\d\.\d\d)(?:\*\*)? (\[\d\.\d\d, \d\.\d\d\])", section)
    assert len(cells) == 2 * 7 * 5  # both temperatures, 4 benchmarks + mean
    for tau, ci in cells:
        assert f"{tau} {ci}" in text, f"experiments/README quotes {tau} {ci}, not in table.md"


def test_routing_plot_of_a_whole_grid_stays_readable(tmp_path):
    """16 routed rows (2 routers x 4 benchmarks x 2 temperatures): one bar each per panel,
    panels stacked so the figure stays a page wide (side by side it was 30 inches)."""
    mod = experiment_script("combination_table")
    rows = load_rows(GRID)
    assert mod.routing_plot(rows, tmp_path / "routing.png")
    png = (tmp_path / "routing.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 800 < width < 2000 and height > 600, (width, height)
    assert not mod.routing_plot([r for r in rows if r["strategy"] == "single"], tmp_path / "x.png")


def _synthetic(strategy: str, data: str, shift: float, noise: float = 0.0, seed: int = 0,
               label: str | None = None) -> list[dict]:  # fmt: skip
    """EAGLE-2 rows at T=0 on the four benchmarks, 12 questions each: a question's tau is its
    own difficulty (shared by every variant) + `shift` + uniform noise of +-`noise`."""
    rng = random.Random(seed)
    rows = []
    for b in BENCHES:
        pq = {str(q): [round(50 * (1.5 + 0.1 * q + shift + rng.uniform(-noise, noise))), 50]
              for q in range(12)}  # fmt: skip
        tau = sum(t for t, _ in pq.values()) / sum(f for _, f in pq.values())
        drafters = ["mathinstruct", "sharegpt"] if strategy != "single" else [data]
        rows.append({"variant": label or f"eagle2/{data}/{strategy}", "routing": label or strategy,
                     "strategy": strategy, "options": {}, "data": data, "drafters": drafters,
                     "drafter": "eagle2", "temperature": 0.0, "bench": b, "tau": tau,
                     "per_question": pq})  # fmt: skip
    return rows


@pytest.mark.parametrize(
    "conf,math,share,noise,want",
    [
        (0.5, 0.0, 0.0, 0.0, "holds"),  # a clear gap over both components
        (0.0, 0.5, -0.5, 0.0, "fails"),  # reversed against the math drafter, resolved
        (0.0, 0.0, -0.5, 0.5, "unresolved"),  # level with math, within the noise
    ],
)
def test_a_finding_holds_fails_or_stays_unresolved(conf, math, share, noise, want):
    """Finding 4 (confidence beats each single drafter it combines) on rows built to force each
    verdict; variants are picked by `strategy`/`data`, not their labels: the confidence rows
    here are labelled like averaging, and no averaging finding is made of them."""
    rows = (_synthetic("confidence", "mix", conf, noise, 1, label="average(0.5)")
            + _synthetic("single", "mathinstruct", math, noise, 2)
            + _synthetic("single", "sharegpt", share, noise, 3))  # fmt: skip
    verdicts = {v.finding: v for v in grade_all(rows)}
    assert set(verdicts) == {"1", "4"}  # 1: math vs ShareGPT; no mixture, averaging, merging
    four = verdicts["4"]
    assert four.grade == want, [c.text() for c in four.required]
    assert [c.b for c in four.required] == ["math", "ShareGPT"]
    if want == "unresolved":
        assert four.required[0].ci[0] < 0 < four.required[0].ci[1]
    # The paper's table has no per-question data: the same rows graded by direction only.
    bare = [{k: v for k, v in r.items() if k != "per_question"} for r in rows]
    by_sign = {v.finding: v for v in grade_all(bare, intervals=False)}["4"]
    assert by_sign.grade == {"holds": "holds", "fails": "fails"}.get(want, by_sign.grade)
    no_ci = {v.finding: v for v in grade_all(bare)}["4"]
    assert no_ci.grade == "unresolved"  # graded by intervals without any: nothing resolved


def test_grading_rules():
    """every=True: all resolved for -> holds, any resolved against -> fails; every=False (2b):
    any resolved for -> holds, all resolved against -> fails; otherwise unresolved."""
    yes, no, open_ = (Comparison("a", "b", 1, 1, d, ci) for d, ci in
                      ((0.2, (0.1, 0.3)), (-0.2, (-0.3, -0.1)), (0.1, (-0.1, 0.3))))  # fmt: skip
    assert grade([yes, yes]) == "holds" and grade([yes, open_]) == "unresolved"
    assert grade([yes, open_, no]) == "fails"
    assert grade([no, yes], every=False) == "holds" and grade([no, no], every=False) == "fails"
    assert grade([no, open_], every=False) == "unresolved"
    assert grade([open_], intervals=False) == "holds"  # by direction: +0.1 > 0


def test_schema_1_rows_are_upgraded_from_config_routing():
    """Stored schema-1 files lack `strategy`/`options`; the loader takes them from the job's
    config.routing (name, and everything but name/label/drafters), never from a label."""
    rows = load_rows(GRID)
    got = {(r["variant"], r["strategy"], json.dumps(r["options"], sort_keys=True)) for r in rows}
    assert got == {
        ("eagle2/mix/average(0.5)", "average", '{"alpha": 0.5, "weights": null}'),
        ("eagle2/mix/confidence", "confidence", "{}"),
        ("eagle2/mix/entropy", "entropy", "{}"),
        ("eagle2/mix/merged_tree(full)", "merged_tree", '{"budget": "full", "dedup": true}'),
        ("eagle2/mix/merged_tree(matched)", "merged_tree", '{"budget": "matched", "dedup": true}'),
        ("eagle2/mathinstruct", "single", "{}"),
        ("eagle2/sharegpt", "single", "{}"),
    }
    routing = {"name": "average", "label": "x", "drafters": ["a"], "alpha": 1}
    doc = {"schema_version": 1, "rows": [{"routing": "x"}], "config": {"routing": routing}}
    want = {"routing": "x", "strategy": "average", "options": {"alpha": 1}}
    assert rows_of(doc, "f.json") == [want]
    v2 = {"schema_version": 2, "rows": [{"strategy": "entropy", "options": {}}]}
    assert rows_of(v2, "g.json") == v2["rows"]  # schema 2: as written


def test_unreadable_schemas_fail_naming_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    bad = tmp_path / "a" / "results.json"
    bad.write_text(json.dumps({"schema_version": 3, "rows": []}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: unknown .*schema_version 3"):
        load_rows(tmp_path)
    bad.write_text(json.dumps({"schema_version": 2, "rows": [{"variant": "v", "strategy": "x"}]}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: a row without"):
        load_rows(tmp_path)
    bad.write_text(json.dumps({"schema_version": 1, "rows": [], "config": {}}))
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_rows(tmp_path)
