"""Wall-clock speed of speculative decoding against the baselines a user would pick, on the same
prompts in one process (issue 7):

  (a) transformers `generate`, greedy or sampling      (b) transformers prompt-lookup decoding
  (c) our vanilla decoding                              (d) ours, speculative: single, confidence,
                                                            merged trees

    python experiments/speed.py [hydra overrides ...]   # defaults: conf/experiment/speed.yaml
    python experiments/speed.py bench.limit=3 max_new_tokens=64 tree.total_tokens=20

Prints tokens/s, speedups (medians over prompts of per-prompt ratios) against (a) and (c), tau,
whether outputs equal (a)'s at T=0, and the ideal speedup tau x t_step / (t_draft + t_verify)
from the measured cost of one vanilla step, one tree draft and one tree verification.
Writes speed.json into outputs/speed/<stamp>/.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from taps.combine import build_proposer
from taps.config import CONF_DIR, register_resolvers
from taps.data.benchmarks import load_benchmark
from taps.data.template import prompt_ids
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import TreeSpec
from taps.engine.tree import verification_inputs
from taps.models.target import convert_gguf, smollm2_gguf_path
from taps.paths import atomic_write_text
from taps.run import drafter_data
from taps.training.train import ensure_drafter


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def _forward(target, tokens, positions, cache, mask=None):
    return target.logits(target(tokens, positions, cache, mask)[0])


def hf_model(cfg):
    from transformers import AutoModelForCausalLM

    path = convert_gguf(smollm2_gguf_path(), cfg.paths.cache_dir)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def unit_costs(target, proposer, prompt: list[int], reps: int = 5) -> dict:
    """Seconds per vanilla step, per tree draft and per tree verification, after a prefill."""
    dev = target.lm_head.weight.device
    cache = target.new_cache(len(prompt) + 256)
    feats = target(torch.tensor([prompt], device=dev), cache=cache)[0]
    root = int(target.logits(feats[-1]).argmax())
    proposer.start(feats, torch.tensor(prompt[1:] + [root]), len(prompt) + 256)
    prefix = cache.length
    draft, verify, step = [], [], []
    for _ in range(reps):
        tree, dt = _timed(proposer.propose)
        draft.append(dt)
        tokens, pos, mask = verification_inputs(tree, prefix, dev)
        _, dt = _timed(_forward, target, tokens, pos, cache, mask)
        verify.append(dt)
        cache.truncate(prefix)
        _, dt = _timed(_forward, target, tokens[:, :1], pos[:, :1], cache)
        step.append(dt)
        cache.truncate(prefix)
    med = statistics.median
    return {"step_s": med(step), "draft_s": med(draft), "verify_s": med(verify),
            "tree_tokens": len(tree)}  # fmt: skip


def main(overrides: list[str]) -> dict:
    register_resolvers()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["experiment=speed", *overrides])
    torch.manual_seed(cfg.seed)
    target = instantiate(cfg.target)
    model, tok, eos = target.model, target.tokenizer, target.eos_ids
    spec = TreeSpec(cfg.tree.top_k, cfg.tree.depth, cfg.tree.total_tokens)
    heads = {}
    for data in drafter_data(OmegaConf.merge(cfg, {"routing": {"name": "confidence"}})):
        heads[str(data.name)] = ensure_drafter(
            target, cfg.drafter, data, cfg.trainer, cfg.paths.cache_dir, cfg.paths.data_dir,
            cfg.seed)[0]  # fmt: skip
    first = heads[str(cfg.speed.single)]
    both = list(heads.values())
    methods = {
        "ours_spec_single": SpeculativeDecoder(model, build_proposer("single", [first], spec), eos),
        "ours_spec_confidence": SpeculativeDecoder(
            model, build_proposer("confidence", both, spec), eos),
        "ours_spec_merged_matched": SpeculativeDecoder(
            model, build_proposer("merged_tree", both, spec, budget="matched"), eos),
    }  # fmt: skip
    hf = hf_model(cfg)
    temp = float(cfg.temperature)
    sample = {"do_sample": temp > 0, **({"temperature": temp, "top_k": 0} if temp > 0 else {})}
    n_new = int(cfg.max_new_tokens)
    hf_kw = {"max_new_tokens": n_new, "pad_token_id": tok.eos_token_id, **sample}
    per_prompt: list[dict] = []
    prompts = load_benchmark(cfg.bench.benchmarks[0], cfg.paths.data_dir, cfg.bench.limit)
    for q in prompts:
        ids = prompt_ids(tok, [{"role": "user", "content": q.turns[0]}])
        x = torch.tensor([ids])
        rec: dict = {"question_id": q.question_id}
        gen = torch.Generator().manual_seed(cfg.seed)
        out, dt = _timed(hf.generate, x, **hf_kw)
        rec["hf_generate"] = {"tokens": out[0, len(ids) :].tolist(), "s": dt}
        if temp <= 0:  # prompt lookup is greedy-only in transformers
            out, dt = _timed(hf.generate, x, prompt_lookup_num_tokens=10, **hf_kw)
            rec["hf_prompt_lookup"] = {"tokens": out[0, len(ids) :].tolist(), "s": dt}
        g, dt = _timed(vanilla_generate, model, ids, n_new, eos, temp, 1.0, gen)
        rec["ours_vanilla"] = {"tokens": g.tokens, "s": dt}
        for name, dec in methods.items():
            g, dt = _timed(dec.generate, ids, n_new, temp, 1.0, gen, False)
            rec[name] = {"tokens": g.tokens, "s": dt, "tau": g.tau}
        per_prompt.append(rec)
        print(q.question_id, {k: round(len(v["tokens"]) / v["s"], 1) for k, v in rec.items()
                              if isinstance(v, dict)}, flush=True)  # fmt: skip
    summary = summarise(per_prompt, temp)
    ids = prompt_ids(tok, [{"role": "user", "content": prompts[0].turns[0]}])
    summary["unit_costs"] = {n: unit_costs(model, d.proposer, ids) for n, d in methods.items()}
    for n, c in summary["unit_costs"].items():
        tau = summary["methods"][n]["tau"]
        c["ideal_speedup_vs_vanilla"] = tau * c["step_s"] / (c["draft_s"] + c["verify_s"])
    print(json.dumps(summary, indent=2))
    out_dir = Path(cfg.paths.output_dir) / "speed" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("target", "drafter", "data", "tree", "bench", "max_new_tokens", "temperature", "seed")
    config = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in keys
    }  # fmt: skip  (logger/hydra keys need a Hydra run)
    doc = {"config": config, **summary, "prompts": per_prompt}
    atomic_write_text(out_dir / "speed.json", json.dumps(doc, indent=2))
    print(f"written: {out_dir / 'speed.json'}")
    return doc


def summarise(per_prompt: list[dict], temp: float) -> dict:
    """Medians over prompts of tokens/s and of per-prompt speedups (tokens/s ratios)."""
    names = [k for k in per_prompt[0] if isinstance(per_prompt[0][k], dict)]
    med = statistics.median

    def tps(r: dict, n: str) -> float:
        return len(r[n]["tokens"]) / r[n]["s"]

    out = {}
    for n in names:
        row = {
            "tokens_per_s_median": round(med([tps(r, n) for r in per_prompt]), 2),
            "speedup_vs_hf_generate": round(
                med([tps(r, n) / tps(r, "hf_generate") for r in per_prompt]), 3
            ),
            "speedup_vs_ours_vanilla": round(
                med([tps(r, n) / tps(r, "ours_vanilla") for r in per_prompt]), 3
            ),
        }
        if "tau" in per_prompt[0][n]:
            row["tau"] = round(med([r[n]["tau"] for r in per_prompt]), 3)
        if temp <= 0:
            row["identical_to_hf_generate"] = sum(
                r[n]["tokens"] == r["hf_generate"]["tokens"] for r in per_prompt
            )
        out[n] = row
    return {"temperature": temp, "prompts": len(per_prompt), "methods": out}


if __name__ == "__main__":
    main(sys.argv[1:])
