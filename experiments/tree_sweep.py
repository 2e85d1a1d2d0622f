"""Which draft tree decodes fastest on this hardware: tau and tokens/s of single-drafter
speculative decoding over top_k x depth x total_tokens, against our vanilla decoding, on the
same prompts in one process (issue 7). The winner is what conf/tree/cpu.yaml should hold.

    python experiments/tree_sweep.py [hydra overrides ...]  # conf/tree_sweep.yaml: experiment=tree_sweep
    python experiments/tree_sweep.py bench.limit=3 max_new_tokens=96 'sweep.top_k=[2,4]'

Writes outputs/tree_sweep/<stamp>/: results.json, results.md and tree_sweep.png (speedup and
tau over total_tokens, one line per top_k x depth).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from taps.config import CONF_DIR
from taps.data.drafters import drafter_data
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.precision import cast_for_serving
from taps.paths import atomic_write_text
from taps.report.figures import plt, save_figure
from taps.study import speed
from taps.training.train import build_callbacks, ensure_drafter


def specs(sweep: DictConfig) -> list[TreeSpec]:
    """The grid, plus chains (top_k 1) of each depth; trees too small to use their depth and
    totals a tree cannot fill are skipped. `sweep.sampled: [false, true]` adds drawn trees
    (TreeSpec.sampled: a spine of top_k drawn children a level, 1 + top_k (depth + 1) at most)."""
    out = []
    for drawn in sweep.get("sampled", [False]):
        out += [TreeSpec(1, d, d + 2, sampled=drawn) for d in sweep.depth]
        for k, d, n in itertools.product(sweep.top_k, sweep.depth, sweep.total_tokens):
            most = 1 + k * (d + 1) if drawn else 1 + k + d * k * k
            if k > 1 and d + 2 <= n <= most:
                out.append(TreeSpec(k, d, n, sampled=drawn))
    return out


def name(s: TreeSpec) -> str:
    return f"k{s.top_k}_d{s.depth}_n{s.total_tokens}" + ("_drawn" if s.sampled else "")


def plot(rows: dict, grid: list[TreeSpec], path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, d, drawn in sorted({(s.top_k, s.depth, s.sampled) for s in grid}):
        line = [s for s in grid if (s.top_k, s.depth, s.sampled) == (k, d, drawn)]
        xs = [s.total_tokens for s in line]
        style = ("s" if k == 1 else "o") + (":" if drawn else "--" if k == 1 else "-")
        label = f"k={k} d={d}" + (" drawn" if drawn else "")
        a.plot(xs, [rows[name(s)]["vs_ours_vanilla"] for s in line], style, label=label)
        b.plot(xs, [rows[name(s)]["tau"] for s in line], style, label=label)
    a.axhline(1.0, color="k", lw=0.8)
    a.set(xlabel="tokens per tree (root included)", ylabel="speedup vs our vanilla (median)")
    b.set(xlabel="tokens per tree (root included)", ylabel="tau (median)")
    a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def sweep(cfg: DictConfig, out_dir: Path) -> dict:
    """Decode the prompts with every tree of the grid; write results.json, .md and the plot."""
    target = instantiate(cfg.target)
    (data,) = drafter_data(cfg.data, cfg.drafters)
    head = ensure_drafter(target, cfg.drafter, data, cfg.trainer, cfg.paths.cache_dir,
                          cfg.paths.data_dir, cfg.seed,
                          callbacks=build_callbacks(cfg.get("callbacks")))[0]  # fmt: skip
    cast_for_serving(cfg.eval.get("dtype"), target.model, [head])
    grid = specs(cfg.sweep)
    decoders = {
        name(s): SpeculativeDecoder(target.model, HeadDrafter(head, s), target.eos_ids)
        for s in grid
    }
    temp = float(cfg.temperature)
    methods = speed.our_methods(target.model, decoders, target.eos_ids, temp)
    _, prompts = speed.first_turns(cfg, target.tokenizer)
    print(f"{len(grid)} trees x {len(prompts)} prompts x {cfg.max_new_tokens} tokens", flush=True)
    records = speed.measure(prompts, methods, int(cfg.max_new_tokens), int(cfg.seed),
                            target.device, progress=lambda i, _: print(f"prompt {i + 1} done",
                                                                        flush=True))  # fmt: skip
    summary = speed.speed_summary(records, temp)
    rows = {n.removeprefix("ours_spec_"): r for n, r in summary["methods"].items()}
    best = max((n for n in rows if n != "ours_vanilla"), key=lambda n: rows[n]["vs_ours_vanilla"])
    lines = ["| tree | top_k | depth | total | drawn | tau | tok/s | vs vanilla | ms/cycle draft "
             "| verify |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in grid:
        r = rows[name(s)]
        ms = r["ms_per_cycle"]
        mark = " **best**" if name(s) == best else ""
        lines.append(f"| {name(s)}{mark} | {s.top_k} | {s.depth} | {s.total_tokens} | "
                     f"{'yes' if s.sampled else 'no'} | {r['tau']} "
                     f"| {r['tokens_per_s']} | {r['vs_ours_vanilla']} | {ms.get('draft')} | "
                     f"{ms.get('verify')} |")  # fmt: skip
    lines.append(f"\nour vanilla: {rows['ours_vanilla']['tokens_per_s']} tok/s; "
                 f"{torch.get_num_threads()} threads; T={temp:g}")  # fmt: skip
    doc = {"bench": cfg.bench.benchmarks[0], "threads": torch.get_num_threads(),
           "best": best, "summary": summary, "records": records}  # fmt: skip
    atomic_write_text(out_dir / "results.json", json.dumps(doc, indent=2))
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    plot(rows, grid, out_dir / "tree_sweep.png")
    print("\n".join(lines))
    print(f"best: {best}; written: {out_dir}")
    return doc


@hydra.main(config_path=CONF_DIR, config_name="tree_sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sweep(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
