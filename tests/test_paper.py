"""The paper's study as one command: the study configs compose into the multiruns they name,
the GPU scale and DDP trainer compose, a two-job joblib multirun works here (each drafter
trained once under the lock, a re-run decodes nothing), and experiments/paper.py skips only
studies that are really up to date."""

from __future__ import annotations

import importlib.util
import json
import os
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
from taps.study.paper import BENCHES, STUDIES

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def _script(name: str = "paper"):
    """experiments/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    store_cell(tmp_path, key, {"tau": 2.0}, base)
    assert load_cell(tmp_path, key) == {"tau": 2.0}
    (tmp_path / "cells" / f"{key}.json").write_text("{not json")
    assert load_cell(tmp_path, key) is None  # decoded again, never a crash or a stale row


def test_paper_script_skips_only_what_is_up_to_date(tmp_path):
    paper = _script()
    cache, out = tmp_path / "cache", tmp_path / "out"
    study = out / "runs" / "depth"
    (study / "0").mkdir(parents=True)
    (study / "0" / "results.json").write_text(json.dumps({"rows": [{"cell": "abc"}]}))
    store_cell(cache, "abc", {"tau": 1.5}, {})
    stamp = paper.fingerprint(["bench.limit=2"], "")
    assert not paper.up_to_date(study, stamp, cache)  # never finished
    (study / "done.json").write_text(json.dumps({"fingerprint": stamp}))
    assert paper.up_to_date(study, stamp, cache)
    assert not paper.up_to_date(study, paper.fingerprint(["bench.limit=3"], ""), cache)
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
    from taps.study.paper import BENCHES, KINDS, VARIANTS, load_rows, pick

    studies = {s: load_rows(FIXTURE, s) for s in STUDIES}
    report = (FIXTURE / "report.md").read_text()
    checked = 0
    for block in report.split("\n### ")[1:]:
        head, *lines = block.splitlines()
        kind_name, temp = head.split(", T=")
        kind = next(k for k, v in KINDS.items() if v == kind_name)
        for line in lines:
            cells = [c.strip() for c in line.strip("|").split("|")]
            variant = next((v for v in VARIANTS if v[0] == cells[0]), None)
            if variant is None:
                continue
            rows = pick(studies[variant[1]], kind, float(temp), **variant[2])
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
    """experiments/combination_table.py on a real run's rows: findings per drafter kind and
    temperature, single drafters limited to the combinations' components, differences equal to
    the rows' own means, and both figures written."""
    mod = _script("combination_table")
    rows = mod.load_rows([str(FIXTURE / "runs" / s) for s in ("combination", "specialization")])
    table, means = mod.grid(rows)
    text = mod.findings(rows, means)
    for head in ("eagle2", "hass"):
        for temp in ("0", "1"):
            start = text.index(f"- {head}, T={temp}, mean tau:")
            block = text[start:].split("\n- ")[0]
            # Finding 6 per drafter kind and temperature, never pooled across them.
            assert "6a (confidence" in block and "6b (rejected" in block
    assert "single:mix" not in text  # the mixture's own drafter is not a component
    pick = {(r["variant"], r["bench"]): r["tau"] for r in rows if r["temperature"] == 0.0}
    conf, share = "eagle2/mix/confidence", "eagle2/sharegpt"
    want = sum(pick[conf, b] - pick[share, b] for b in BENCHES) / len(BENCHES)
    line = next(x for x in text.splitlines() if x.startswith("- eagle2, T=0,"))
    block = text[text.index(line) :].split("\n- ")[0]
    assert f"confidence - single:sharegpt: {want:+.2f} [" in block
    mod.tau_bars(rows, tmp_path / "tau.png")
    assert (tmp_path / "tau.png").stat().st_size > 10_000


GRID = ROOT / "experiments" / "results" / "combination_grid_cpu"


def test_stored_combination_grid_regenerates_its_table_and_the_readme_quotes_it():
    """Issue 5's measured grid: its rows give exactly the stored table.md, and every
    tau-with-interval cell in experiments/README's acceptance-grid section appears in it."""
    mod = _script("combination_table")
    rows = mod.load_rows([str(GRID)])
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
    mod = _script("combination_table")
    rows = mod.load_rows([str(GRID)])
    assert mod.routing_plot(rows, tmp_path / "routing.png")
    png = (tmp_path / "routing.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 800 < width < 2000 and height > 600, (width, height)
    assert not mod.routing_plot([r for r in rows if r["routing"] == "single"], tmp_path / "x.png")
