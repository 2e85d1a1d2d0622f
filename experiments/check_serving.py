"""`make check-serving`: our exported drafters, loaded by vLLM itself, must decode exactly what
we decode and accept what our engine accepts.

    python experiments/check_serving.py [--ckpt DIR ...] [--prompts 4] [--max-tokens 128] [--k 3]

For each drafter (default: the EAGLE-2 and EAGLE-3 drafters `make run`'s data trains, trained
here if missing), on N GSM8K prompts (token ids, float32, greedy, EOS ignored):
1. exports the target (`taps.export what=target`) and the drafter (`engine=vllm`);
2. decodes with our vanilla loop and our engine drafting a chain of K tokens with the head as
   vLLM runs it (an EAGLE-1/2 head over the full vocabulary: vLLM has no d2t there);
3. runs vLLM (the serving venv, experiments/serving_vllm.py) without and with EAGLE
   speculation (num_speculative_tokens = K);
4. checks: vLLM's outputs equal ours, token for token, and its mean acceptance length
   (1 + accepted / drafts, from its spec-decode metrics) equals ours (1 + accepted / cycles)
   within 2%. Prints both; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from taps.config import CONF_DIR, register_resolvers
from taps.data.benchmarks import load_benchmark
from taps.data.template import prompt_ids
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import with_full_vocab
from taps.models.heads import load_head
from taps.models.serving import export_head
from taps.models.target import Target, load_smollm2
from taps.paths import REPO_ROOT, default_cache_dir, default_data_dir

TOLERANCE = 0.02


def default_drafters(target: Target) -> list[Path]:
    """`make run`'s drafter and an EAGLE-3 drafter on the same data (trained if missing)."""
    from taps.data.drafters import drafter_data
    from taps.training.train import ensure_drafter

    out = []
    for kind in ("eagle2", "eagle3"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", ["experiment=quickstart", f"drafter={kind}"])
        (data,) = drafter_data(cfg.data, cfg.drafters, False)
        _, meta = ensure_drafter(target, cfg.drafter, data, cfg.trainer, cfg.paths.cache_dir,
                                 cfg.paths.data_dir, cfg.seed)  # fmt: skip
        out.append(Path(cfg.paths.cache_dir) / "drafters" / f"{kind}-{data.name}-{meta['key']}")
    return out


def ours(target: Target, head, prompts: list[list[int]], n: int, k: int) -> dict:
    """Our vanilla and chain-speculative decoding, as vLLM will run them."""
    served = with_full_vocab(head) if head.kind == "eagle2" and head.d2t is not None else head
    dec = SpeculativeDecoder(target.model, HeadDrafter(served, TreeSpec(1, k - 1, k + 1)), set())
    vanilla, spec, accepted, cycles = [], [], 0, 0
    for p in prompts:
        vanilla.append(vanilla_generate(target.model, p, n, set()).tokens)
        g = dec.generate(p, n)
        spec.append(g.tokens)
        accepted += sum(c.accepted for c in g.cycles)
        cycles += len(g.cycles)
    return {"vanilla": vanilla, "spec": spec, "mean_acceptance_length": 1 + accepted / cycles,
            "accepted": accepted, "cycles": cycles}  # fmt: skip


def vllm(python: str, job: dict, work: Path, name: str) -> dict:
    job_file, out_file = work / f"job-{name}.json", work / f"vllm-{name}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    script = str(REPO_ROOT / "experiments" / "serving_vllm.py")
    subprocess.run([python, script, str(job_file), str(out_file)], check=True, env=env)
    return json.loads(out_file.read_text())


def check(name: str, mine: dict, base: dict, spec: dict) -> list[str]:
    """Failures of one drafter's comparison; prints the figures."""
    same_vanilla = sum(a == b for a, b in zip(mine["vanilla"], base["tokens"], strict=True))
    same_spec = sum(a == b for a, b in zip(mine["spec"], spec["tokens"], strict=True))
    ours_len, theirs = mine["mean_acceptance_length"], spec["spec"]["mean_acceptance_length"]
    n = len(mine["vanilla"])
    print(f"\n{name}: vLLM {spec['vllm_version']}")
    print(f"  vanilla outputs identical to ours:      {same_vanilla}/{n}")
    print(f"  speculative outputs identical to ours:  {same_spec}/{n}")
    print(f"  mean acceptance length: vLLM {theirs:.4f} ({spec['spec']['accepted']} accepted in "
          f"{spec['spec']['drafts']} drafts), ours {ours_len:.4f} ({mine['accepted']} in "
          f"{mine['cycles']} cycles)")  # fmt: skip
    fails = []
    if same_vanilla < n or same_spec < n:
        fails.append(f"{name}: outputs differ from ours")
    if theirs is None or abs(theirs - ours_len) > TOLERANCE * ours_len:
        fails.append(f"{name}: acceptance {theirs} vs ours {ours_len:.4f} (> {TOLERANCE:.0%})")
    return fails


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", help="drafter dir(s); default: make run's two")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=3, help="draft tokens per step (chain length)")
    ap.add_argument("--python", default=str(REPO_ROOT / ".venv-serving" / "bin" / "python"))
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "serving"))
    args = ap.parse_args()
    register_resolvers()
    torch.manual_seed(0)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    target = load_smollm2(default_cache_dir())
    ckpts = [Path(c) for c in args.ckpt] if args.ckpt else default_drafters(target)
    from taps.export import main as export_main

    target_dir = export_main(["what=target", f"out={work / 'target'}"])
    qs = load_benchmark("gsm8k", default_data_dir(), args.prompts)
    prompts = [prompt_ids(target.tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    job = {"target": str(target_dir), "prompts": prompts, "max_tokens": args.max_tokens}
    base = vllm(args.python, {**job, "run": {"name": "vanilla"}}, work, "vanilla")
    fails = []
    for ckpt in ckpts:
        head, _ = load_head(ckpt, target.model)
        out = export_head(head, target.model.config, work / ckpt.name, "vllm", str(target_dir),
                          args.k)  # fmt: skip
        method = "eagle3" if head.kind == "eagle3" else "eagle"
        run = {"name": ckpt.name, "method": method, "draft": str(out), "k": args.k}
        spec = vllm(args.python, {**job, "run": run}, work, ckpt.name)
        fails += check(f"{head.kind} {ckpt.name}", ours(target, head, prompts, args.max_tokens,
                                                        args.k), base, spec)  # fmt: skip
    print("\n" + ("FAILED:\n  " + "\n  ".join(fails) if fails else "check-serving: all passed"))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
