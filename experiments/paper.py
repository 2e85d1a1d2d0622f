"""The paper's whole study, one command: five Hydra multiruns, then outputs/paper/report.md.

    python experiments/paper.py [hydra overrides for every study ...]
    python experiments/paper.py hydra/launcher=parallel          # 2 jobs at a time (make paper)
    python experiments/paper.py scale=paper_gpu trainer=ddp hydra/launcher=slurm
    python experiments/paper.py --report-only                    # rebuild the report

Studies (conf/experiment/): specialization, combination, averaging_sweep, routing_signals,
depth. Drafters and benchmark cells are cached by content (.cache/drafters, .cache/cells), so
an interrupted run resumes where it stopped and a finished one re-runs in about a minute
without training or decoding. Each study's jobs land in outputs/paper/runs/<study>/<job>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from taps.eval.grid import machine
from taps.models.precision import bf16_is_fast
from taps.models.target import resolve_device
from taps.paths import (
    REPO_ROOT,
    atomic_write_text,
    default_cache_dir,
    default_data_dir,
    hash_source_files,
)
from taps.study.dashboards import log_study
from taps.study.paper import STUDIES, study_rows, write_report


def _count(path: Path, pattern: str) -> int:
    return sum(1 for _ in path.glob(pattern)) if path.is_dir() else 0


def fingerprint(overrides: list[str], data_dir: str) -> str:
    """Everything a finished study's results depend on besides the cache: the code, the
    configs, the overrides, the data files (names, sizes, times) and the machine that timed
    it (its cells are keyed by it too: taps/eval/grid.py `machine`)."""
    h = hashlib.sha256(json.dumps([overrides, machine(resolve_device("auto"))]).encode())
    hash_source_files(h, ["taps", "conf"], (".py", ".yaml"))
    for f in sorted(Path(data_dir).rglob("*")) if data_dir else []:
        if f.is_file():
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def up_to_date(study_dir: Path, stamp: str, cache: Path) -> bool:
    """The study finished with this fingerprint and every cell its results cite is cached."""
    try:
        done = json.loads((study_dir / "done.json").read_text())
    except (OSError, ValueError):
        return False
    if done.get("fingerprint") != stamp:
        return False
    cells = [r.get("cell") for r in study_rows(study_dir.parent.parent, study_dir.name)]
    return bool(cells) and all(c and (cache / "cells" / f"{c}.json").is_file() for c in cells)


def run_studies(out: Path, overrides: list[str], cache: Path, force: bool = False) -> dict:
    """Run each study's multirun; returns what this invocation trained, decoded and took."""
    record = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": overrides, "studies": {}}
    t_all = time.perf_counter()
    stamp = fingerprint(overrides, default_data_dir())
    env = dict(os.environ)
    if "TAPS_BF16" not in env and not torch.cuda.is_available():
        # Decide once, for every job: `auto` precisions enter cache keys, and a timing probe
        # run in each job under full load could, rarely, decide differently.
        env["TAPS_BF16"] = "1" if bf16_is_fast("cpu") else "0"
    for study in STUDIES:
        if not force and up_to_date(out / "runs" / study, stamp, cache):
            print(f"=== {study}: up to date (runs/{study}/done.json; --force re-checks)")
            record["studies"][study] = {"seconds": 0.0, "drafters_trained": 0,
                                        "cells_decoded": 0, "skipped": True}  # fmt: skip
            continue
        before = (
            _count(cache / "drafters", "*/head.safetensors"),
            _count(cache / "cells", "*.json"),
        )
        cmd = [sys.executable, "-m", "taps.run", "-m", f"experiment={study}",
               f"hydra.sweep.dir={out / 'runs' / study}", *overrides]  # fmt: skip
        print(f"\n=== {study}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env)
        record["studies"][study] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "drafters_trained": _count(cache / "drafters", "*/head.safetensors") - before[0],
            "cells_decoded": _count(cache / "cells", "*.json") - before[1],
        }
        print(f"=== {study}: {record['studies'][study]}", flush=True)
        done = {"fingerprint": stamp, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(out / "runs" / study / "done.json", json.dumps(done))
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    return record


def log_to_wandb(out: Path, studies: list[str], overrides: list[str]) -> None:
    """Study summary runs for the studies that ran, with the jobs' logger settings."""
    opts = dict(o.split("=", 1) for o in overrides if o.startswith("logger"))
    if opts.get("logger", "wandb") != "wandb":
        return
    for study in studies:
        where = log_study(study, study_rows(out, study), out, opts.get("logger.project", "taps"),
                          opts.get("logger.mode", "offline"))  # fmt: skip
        if where:
            print(f"W&B {study}: {Path(where).parent}")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "paper"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from results")
    ap.add_argument("--cache-dir", default=default_cache_dir())
    ap.add_argument("--force", action="store_true", help="run every study's multirun again")
    args, overrides = ap.parse_known_args(argv)
    out = Path(args.out)
    log = out / "timing.json"
    history = json.loads(log.read_text()) if log.is_file() else []
    if not args.report_only:
        history.append(run_studies(out, overrides, Path(args.cache_dir), args.force))
        atomic_write_text(log, json.dumps(history, indent=2))
    t0 = time.perf_counter()
    report = write_report(out, history)
    print(f"\nreport: {report} ({time.perf_counter() - t0:.0f} s to build)")
    ran = [s for s, r in history[-1]["studies"].items() if not r.get("skipped")] if history else []
    log_to_wandb(out, STUDIES if args.report_only else ran, overrides)
    if history:
        last = history[-1]
        done = {k: sum(s[k] for s in last["studies"].values())
                for k in ("drafters_trained", "cells_decoded")}  # fmt: skip
        print(f"this run: {last['seconds']:.0f} s, {done}")
    return report


if __name__ == "__main__":
    main()
