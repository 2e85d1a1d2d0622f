"""Wall-clock speed of speculative decoding against the baselines a user would pick, on the same
prompts in one process (issue 7):

  (a) transformers `generate`, greedy or sampling      (b) transformers prompt-lookup decoding
  (c) our vanilla decoding                              (d) ours, speculative: single, confidence,
                                                            merged trees

    python experiments/speed.py [hydra overrides ...]   # defaults: conf/experiment/speed.yaml
    python experiments/speed.py bench.limit=3 max_new_tokens=64 'speed.methods=[ours_vanilla,single]'

Prints and writes (outputs/speed/<stamp>/: results.json, results.md, speed.png, and an offline
W&B run) tokens/s, speedups (medians over prompts of per-prompt ratios) against (a) and (c),
tau, whether outputs equal (a)'s at T=0, milliseconds per cycle by phase (draft, verify,
accept, commit), peak memory, and the ideal speedup tau x t_step / (t_draft + t_verify) from
the measured cost of one vanilla step, one tree draft and one verification.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from taps.combine import build_proposer  # noqa: E402
from taps.engine.decoder import SpeculativeDecoder  # noqa: E402
from taps.engine.drafting import TreeSpec  # noqa: E402
from taps.models.draft_head import with_full_vocab  # noqa: E402
from taps.models.precision import cast_for_serving  # noqa: E402
from taps.models.target import Target, convert_gguf, smollm2_gguf_path  # noqa: E402
from taps.paths import atomic_write_text  # noqa: E402
from taps.report.figures import save_figure  # noqa: E402
from taps.run import drafter_data  # noqa: E402
from taps.study import speed  # noqa: E402
from taps.training.train import ensure_drafter  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Speculative methods: config name -> (strategy, options, drafters: single or every component).
STRATEGIES = {
    "single": ("single", {}, "one"),
    "single_full_vocab": ("single", {}, "one"),  # the same head without its draft vocabulary
    "confidence": ("confidence", {}, "all"),
    "merged_matched": ("merged_tree", {"budget": "matched"}, "all"),
    "merged_full": ("merged_tree", {"budget": "full"}, "all"),
}
HF = ("hf_generate", "hf_prompt_lookup")


def hf_model(cfg: DictConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    path = convert_gguf(smollm2_gguf_path(), cfg.paths.cache_dir)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def load_heads(cfg: DictConfig, target: Target, wanted: list[str]) -> dict:
    """The drafters the requested strategies need: the `speed.single` component alone, or
    every component of the data mixture (trained if missing, cached by content)."""
    everyone = any(STRATEGIES[m][2] == "all" for m in wanted)
    heads = {}
    for data in drafter_data(OmegaConf.merge(cfg, {"routing": {"name": "confidence"}})):
        if everyone or str(data.name) == str(cfg.speed.single):
            heads[str(data.name)] = ensure_drafter(
                target, cfg.drafter, data, cfg.trainer, cfg.paths.cache_dir, cfg.paths.data_dir,
                cfg.seed)[0]  # fmt: skip
    if str(cfg.speed.single) not in heads:
        raise ValueError(
            f"speed.single={cfg.speed.single}: not a component of data={cfg.data.name}"
        )
    return heads


def build_methods(cfg: DictConfig, target: Target) -> tuple[dict, dict]:
    """Our methods named in speed.methods (vanilla, speculative strategies) and the decoders."""
    names = list(cfg.speed.methods)
    unknown = [m for m in names if m not in (*HF, "ours_vanilla", *STRATEGIES)]
    if unknown:
        raise ValueError(f"speed.methods: unknown {unknown}; known: "
                         f"{[*HF, 'ours_vanilla', *STRATEGIES]}")  # fmt: skip
    temp = float(cfg.temperature)
    spec = TreeSpec(cfg.tree.top_k, cfg.tree.depth, cfg.tree.total_tokens)
    wanted = [m for m in names if m in STRATEGIES]
    heads = load_heads(cfg, target, wanted) if wanted else {}
    decoders = {}
    for m in wanted:
        strategy, options, who = STRATEGIES[m]
        use = [heads[str(cfg.speed.single)]] if who == "one" else list(heads.values())
        if m == "single_full_vocab":
            use = [with_full_vocab(use[0])]
        proposer = build_proposer(strategy, use, spec, **options)
        decoders[f"ours_spec_{m}"] = SpeculativeDecoder(
            target.model, proposer, target.eos_ids, lazy_logits_from=cfg.eval.lazy_logits_from
        )
    methods = speed.our_methods(target.model, decoders, target.eos_ids, temp)
    return {k: v for k, v in methods.items() if k.removeprefix("ours_spec_") in names}, decoders


def markdown(summary: dict) -> str:
    cols = ["tokens_per_s", "vs_hf_generate", "vs_ours_vanilla", "tau",
            "identical_to_hf_generate", "peak_memory_mb"]  # fmt: skip
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    costs = summary.get("unit_costs") or {}
    if costs:
        lines += ["", "| method | step ms | draft ms | verify ms | tree tokens | ideal speedup |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for n, c in costs.items():
            lines.append(f"| {n} | {1e3 * c['step_s']:.1f} | {1e3 * c['draft_s']:.1f} | "
                         f"{1e3 * c['verify_s']:.1f} | {c['tree_tokens']} | "
                         f"{c['ideal_speedup_vs_vanilla']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    """Left: tokens/s per method. Right: milliseconds per cycle by phase for the speculative
    methods, against the time vanilla decoding needs for the same tau tokens."""
    rows = summary["methods"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(rows)
    tps = [rows[n]["tokens_per_s"] for n in names]
    a.barh(names, tps, color=["#888" if not n.startswith("ours_spec") else "#3a7" for n in names])
    for y, n in enumerate(names):
        a.text(tps[y], y, f" {rows[n].get('vs_hf_generate', '')}x", va="center", fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("tokens/s (median over prompts; label: speedup vs transformers generate)")
    spec = [n for n in names if "ms_per_cycle" in rows[n]]
    step = 1e3 / rows["ours_vanilla"]["tokens_per_s"] if "ours_vanilla" in rows else None
    left = [0.0] * len(spec)
    for phase in ("draft", "verify", "accept", "commit"):
        w = [rows[n]["ms_per_cycle"].get(phase, 0.0) for n in spec]
        b.barh(spec, w, left=left, label=phase)
        left = [x + y for x, y in zip(left, w, strict=True)]
    if step is not None:
        b.scatter([step * rows[n]["tau"] for n in spec], spec, marker="|", s=300, color="k",
                  label="vanilla time for tau tokens", zorder=3)  # fmt: skip
    b.invert_yaxis()
    b.set_xlabel("ms per cycle")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5)
    fig.suptitle(f"T={summary['temperature']:g}, {summary['prompts']} prompts, "
                 f"{summary['threads']} threads, {summary['device']}")  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)
    return path


def main(overrides: list[str]) -> dict:
    cfg, out_dir = speed.compose_experiment("speed", overrides)
    torch.manual_seed(cfg.seed)
    target = instantiate(cfg.target)
    methods, decoders = build_methods(cfg, target)  # trains missing drafters first
    heads = [
        x.head for d in decoders.values() for x in getattr(d.proposer, "drafters", [d.proposer])
    ]
    cast_for_serving(cfg.eval.get("dtype"), target.model, heads)
    dev, dtype = target.device, target.model.lm_head.weight.dtype
    if any(m in HF for m in cfg.speed.methods):
        hf = speed.hf_methods(hf_model(cfg, dtype, dev), target.tokenizer.eos_token_id,
                              float(cfg.temperature), int(cfg.speed.prompt_lookup))  # fmt: skip
        methods = {**{k: v for k, v in hf.items() if k in cfg.speed.methods}, **methods}
    bench = cfg.bench.benchmarks[0]
    questions, prompts = speed.first_turns(cfg, target.tokenizer)

    def show(i: int, rec: dict) -> None:
        tps = {
            k: round(len(v["tokens"]) / v["s"], 1) for k, v in rec.items() if isinstance(v, dict)
        }
        print(f"[{i + 1}/{len(prompts)}] {questions[i].question_id} tok/s {tps}", flush=True)

    records = speed.measure(prompts, methods, int(cfg.max_new_tokens), int(cfg.seed), dev,
                            int(cfg.speed.warmup_tokens), show)  # fmt: skip
    summary = speed.summarise(records, float(cfg.temperature))
    summary.update(bench=bench, threads=torch.get_num_threads(), device=str(dev),
                   dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    summary["unit_costs"] = {}
    for n, d in decoders.items():
        c = speed.unit_costs(d, prompts[0])
        c["ideal_speedup_vs_vanilla"] = round(
            summary["methods"][n]["tau"] * c["step_s"] / (c["draft_s"] + c["verify_s"]), 3
        )
        summary["unit_costs"][n] = c
    keys = ("target", "drafter", "data", "tree", "bench", "max_new_tokens", "temperature",
            "seed", "speed")  # fmt: skip
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
              else cfg[k] for k in keys}  # fmt: skip
    doc = {"config": config, **summary, "records": records}
    atomic_write_text(out_dir / "results.json", json.dumps(doc, indent=2))
    table = markdown(summary)
    atomic_write_text(out_dir / "results.md", table)
    png = plot(summary, out_dir / "speed.png")
    logger = instantiate(OmegaConf.merge(cfg.logger, {"dir": str(out_dir)})
                         if "dir" in cfg.logger else cfg.logger)  # fmt: skip
    logger.start({**config, "experiment": "speed"})
    cols = ["method", "tokens_per_s", "vs_hf_generate", "vs_ours_vanilla", "tau"]
    logger.log_table("speed", cols, [[n, *(r.get(c) for c in cols[1:])]
                                     for n, r in summary["methods"].items()])  # fmt: skip
    logger.log_image("speed", png)
    logger.log_summary(
        {f"tokens_per_s/{n}": r["tokens_per_s"] for n, r in summary["methods"].items()}
    )
    logger.finish()
    print(table)
    print(f"written: {out_dir / 'results.json'}, results.md, speed.png")
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
