"""Wall-clock speed of speculative decoding against the baselines a user would pick, on the same
prompts in one process (issue 7):

  (a) transformers `generate`, greedy or sampling      (b) transformers prompt-lookup decoding
  (c) our vanilla decoding                              (d) ours, speculative: single, confidence,
                                                            merged trees
  (e) `oracle`: the target drafting for itself on the same tree, whose tau is the ceiling of any
      drafter there; results.md then says what each method would reach with a drafter that good

    python experiments/speed.py [hydra overrides ...]   # conf/speed.yaml: experiment=speed
    python experiments/speed.py bench.limit=3 max_new_tokens=64 'speed.methods=[ours_vanilla,single]'

Prints and writes (outputs/speed/<stamp>/: results.json, results.md, speed.png, and an offline
W&B run) tokens/s, speedups (medians over prompts of per-prompt ratios) against (a) and (c),
tau, whether outputs equal (a)'s and (c)'s at T=0 (each divergence from (c) classified as a
near-tie of the target's top-2 logits or not: exit 1, after writing, if one is not),
milliseconds per cycle by phase (draft, verify, accept, commit), peak memory, and the ideal
speedup tau x t_step / (t_draft + t_verify) from the measured cost of one vanilla step, one
tree draft and one verification.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from taps.combine import check_sampled, strategy
from taps.config import CONF_DIR, compose_option
from taps.data.drafters import drafter_data
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.oracle import OracleDrafter
from taps.models.draft_head import DraftHead, with_full_vocab
from taps.models.precision import cast_for_serving
from taps.models.target import Target, convert_gguf, smollm2_gguf_path
from taps.paths import atomic_write_text
from taps.report.figures import plt, save_figure
from taps.study import speed
from taps.training.train import build_callbacks, ensure_drafter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HF = ("hf_generate", "hf_prompt_lookup")
# The target drafting for itself on the same tree: its tau is the ceiling of any drafter there
# (taps/engine/oracle.py); its tokens/s mean nothing (a target forward per tree level).
ORACLE = "oracle"
ORACLE_RUN = f"ours_spec_{ORACLE}"  # its name in records and summaries


def hf_model(cfg: DictConfig, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    path = convert_gguf(smollm2_gguf_path(), cfg.paths.cache_dir)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def load_heads(cfg: DictConfig, target: Target, everyone: bool) -> dict[str, DraftHead]:
    """The drafters the requested strategies need: the `speed.single` component alone, or
    every component of the data mixture (trained if missing, cached by content)."""
    heads = {}
    for data in drafter_data(cfg.data, cfg.drafters, combines=True):
        if everyone or str(data.name) == str(cfg.speed.single):
            heads[str(data.name)] = ensure_drafter(
                target, cfg.drafter, data, cfg.trainer, cfg.paths.cache_dir, cfg.paths.data_dir,
                cfg.seed, callbacks=build_callbacks(cfg.get("callbacks")))[0]  # fmt: skip
    if str(cfg.speed.single) not in heads:
        raise ValueError(
            f"speed.single={cfg.speed.single}: not a component of data={cfg.data.name}"
        )
    return heads


def routing_config(name: str, entry: str | DictConfig) -> DictConfig:
    """speed.strategies[name]: a conf/routing option, or {routing: OPTION, KEY: VALUE, ...} for
    that option with some settings changed (e.g. {routing: hedge, choose: argmax})."""
    if isinstance(entry, str):
        return compose_option("routing", entry)
    extra = OmegaConf.to_container(entry, resolve=True)
    option = extra.pop("routing", None)  # type: ignore[union-attr]
    if not isinstance(option, str):
        raise ValueError(f"speed.strategies.{name}: a mapping needs routing: <conf/routing option>")
    base = compose_option("routing", option)
    unknown = sorted(set(extra) - set(base))  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"speed.strategies.{name}: routing={option} has no setting {unknown}")
    return OmegaConf.merge(base, extra)  # type: ignore[return-value]


def build_methods(cfg: DictConfig, target: Target) -> tuple[dict, dict]:
    """Our methods named in speed.methods (vanilla, speculative strategies) and the decoders;
    each speculative method decodes with the routing config speed.strategies names."""
    names, known = list(cfg.speed.methods), dict(cfg.speed.strategies)
    unknown = [m for m in names if m not in (*HF, speed.VANILLA, ORACLE, *known)]
    if unknown:
        raise ValueError(f"speed.methods: unknown {unknown}; known: "
                         f"{[*HF, speed.VANILLA, ORACLE, *known]}")  # fmt: skip
    spec = instantiate(cfg.tree)
    wanted = {m: strategy(instantiate(routing_config(m, known[m]))) for m in names if m in known}
    for combine in wanted.values():
        check_sampled(combine.name, spec)  # before any head is trained or loaded
    heads = load_heads(cfg, target, any(s.combines for s in wanted.values())) if wanted else {}
    decoders = {}
    for m, combine in wanted.items():
        use = list(heads.values()) if combine.combines else [heads[str(cfg.speed.single)]]
        if m == "single_full_vocab":
            if use[0].kind != "eagle2":
                raise ValueError("single_full_vocab: an EAGLE-3 head has no full-vocabulary twin")
            use = [with_full_vocab(use[0])]
        decoders[f"ours_spec_{m}"] = SpeculativeDecoder(
            target.model, combine(use, spec), target.eos_ids,
            lazy_logits_from=cfg.eval.lazy_logits_from,
        )  # fmt: skip
    if ORACLE in names:
        oracle = OracleDrafter(target.model, spec)
        decoders[ORACLE_RUN] = SpeculativeDecoder(target.model, oracle, target.eos_ids)
    methods = speed.our_methods(target.model, decoders, target.eos_ids, float(cfg.temperature))
    return {k: v for k, v in methods.items() if k.removeprefix("ours_spec_") in names}, decoders


def ceiling(rows: dict) -> dict:
    """Per speculative method, with the oracle measured: its speedup over our vanilla loop
    scaled by the oracle's tau over its own, i.e. what a drafter as good as the target
    itself would give at that method's measured cycle cost (drafting, verifying, overhead)."""
    oracle = rows.get(ORACLE_RUN)
    if oracle is None:
        return {}
    return {
        n: {"tau": r["tau"], "oracle_tau": oracle["tau"],
            "vs_ours_vanilla": round(r["vs_ours_vanilla"] * oracle["tau"] / r["tau"], 2)}
        for n, r in rows.items()
        if n.startswith("ours_spec_") and n != ORACLE_RUN and r.get("tau")
        and r.get("vs_ours_vanilla") is not None
    }  # fmt: skip


def markdown(summary: dict) -> str:
    cols = ["tokens_per_s", "vs_hf_generate", "vs_ours_vanilla", "tau",
            "identical_to_hf_generate", "identical_to_ours_vanilla", "near_ties_vs_ours_vanilla",
            "not_near_ties_vs_ours_vanilla", "peak_memory_mb"]  # fmt: skip
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
    for name, c in (summary.get("ceiling") or {}).items():
        lines.append(f"\n{name}: tau {c['tau']} of the oracle's {c['oracle_tau']} on the same "
                     f"tree; at its own cycle cost, drafting as well as the target would give "
                     f"{c['vs_ours_vanilla']}x our vanilla loop")  # fmt: skip
    paired = summary.get("paired")
    if paired:
        ref, n = paired["ref"], paired["prompts"]
        lines += ["", f"| {ref} / method, per prompt | geometric mean [95%] | median | "
                  f"{ref} faster on |", "|---|---|---|---|"]  # fmt: skip
        for name, p in paired["methods"].items():
            ci = "" if p["ci95"] is None else " [{:.2f}, {:.2f}]".format(*p["ci95"])
            lines.append(f"| {name} | {p['geo_mean']:.2f}{ci} | {p['median']:.2f} | "
                         f"{p['faster_on']} of {n} |")  # fmt: skip
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
    spec = [n for n in names if "ms_per_cycle" in rows[n] and n != ORACLE_RUN]
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


def ref_name(cfg: DictConfig) -> str | None:
    """speed.ref as its records name it (speculative methods get the ours_spec_ prefix)."""
    ref = cfg.speed.get("ref")
    if ref is None:
        return None
    if ref not in cfg.speed.methods:
        raise ValueError(f"speed.ref={ref}: not one of speed.methods {list(cfg.speed.methods)}")
    return ref if ref in (*HF, speed.VANILLA) else f"ours_spec_{ref}"


def measure_all(cfg: DictConfig, out_dir: Path) -> dict:
    """Every method of speed.methods on the same prompts; writes results.json, .md, .png."""
    ref = ref_name(cfg)  # a wrong speed.ref fails before any decoding
    torch.manual_seed(cfg.seed)
    target = instantiate(cfg.target)
    methods, decoders = build_methods(cfg, target)  # trains missing drafters first
    heads = [h for d in decoders.values() for h in d.proposer.heads]
    cast_for_serving(cfg.eval.get("dtype"), target.model, heads, bool(cfg.eval.get("exact")))
    dev, dtype = target.device, target.model.lm_head.weight.dtype
    if any(m in HF for m in cfg.speed.methods):
        hf = speed.hf_methods(hf_model(cfg, dtype, dev), target.tokenizer.eos_token_id,
                              float(cfg.temperature), int(cfg.speed.prompt_lookup))  # fmt: skip
        methods = {**{k: v for k, v in hf.items() if k in cfg.speed.methods}, **methods}
    questions, prompts = speed.first_turns(cfg, target.tokenizer)

    def show(i: int, rec: dict) -> None:
        tps = {
            k: round(len(v["tokens"]) / v["s"], 1) for k, v in rec.items() if isinstance(v, dict)
        }
        print(f"[{i + 1}/{len(prompts)}] {questions[i].question_id} tok/s {tps}", flush=True)

    records = speed.measure(prompts, methods, int(cfg.max_new_tokens), int(cfg.seed), dev,
                            int(cfg.speed.warmup_tokens), show)  # fmt: skip
    for r, q in zip(records, questions, strict=True):
        r["question_id"] = q.question_id
    summary = speed.speed_summary(records, float(cfg.temperature), ref, dtype)
    summary.update(bench=cfg.bench.benchmarks[0], threads=torch.get_num_threads(),
                   device=str(dev), dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    summary["ceiling"] = ceiling(summary["methods"])
    summary["unit_costs"] = {}
    for n, d in decoders.items():
        if n == ORACLE_RUN:
            continue  # its costs are the target's, not a drafter's
        c = speed.unit_costs(d, prompts[0], float(cfg.temperature))
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
    atomic_write_text(out_dir / "results.md", markdown(summary))
    plot(summary, out_dir / "speed.png")
    return doc


def track(cfg: DictConfig, doc: dict, out_dir: Path) -> None:
    """The speed table and plot as an (offline) W&B run in the output directory."""
    logger = instantiate(OmegaConf.merge(cfg.logger, {"dir": str(out_dir)})
                         if "dir" in cfg.logger else cfg.logger)  # fmt: skip
    logger.start({**doc["config"], "experiment": "speed"})
    cols = ["method", "tokens_per_s", "vs_hf_generate", "vs_ours_vanilla", "tau"]
    logger.log_table("speed", cols, [[n, *(r.get(c) for c in cols[1:])]
                                     for n, r in doc["methods"].items()])  # fmt: skip
    logger.log_image("speed", out_dir / "speed.png")
    logger.log_summary({f"tokens_per_s/{n}": r["tokens_per_s"] for n, r in doc["methods"].items()})
    logger.finish()


@hydra.main(config_path=CONF_DIR, config_name="speed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    doc = measure_all(cfg, out_dir)
    track(cfg, doc, out_dir)
    print((out_dir / "results.md").read_text())
    print(f"written: {out_dir / 'results.json'}, results.md, speed.png")
    check_identity(doc["methods"], out_dir)


def check_identity(rows: dict, out_dir: Path) -> None:
    """Exit 1, after the results are written, where a greedy speculative method left our
    vanilla loop where the target had a clear choice: its decoding path is wrong."""
    bad = {n: [(d["question_id"], d["position"], d["top2_gap"], d["threshold"])
               for d in r.get("divergences_not_near_ties", [])] for n, r in rows.items()}  # fmt: skip
    bad = {n: b for n, b in bad.items() if b}
    if bad:
        raise SystemExit(f"error: greedy divergences from our vanilla loop that are not near-ties "
                         f"(method: [(question, token, top-2 gap, threshold)]): {bad}; results "
                         f"kept in {out_dir}")  # fmt: skip


if __name__ == "__main__":
    main()
