"""How far tree verification's logits sit from step-by-step decoding's, per precision: the noise
that makes a greedy divergence a floating-point near-tie (taps/eval/ties.py).

    python experiments/precision_noise.py [--prompts 6] [--tokens 256] [--chunk 8]

For each dtype (float32, bfloat16): greedy-decode GSM8K and MT-Bench prompts step by step, then
recompute the same positions the way verification does (forwards of `--chunk` tokens on top of
the cache, as a chain tree), and compare, at every position, the gap between the step's top-2
tokens in both computations. Prints quantiles of |gap difference| / (eps(dtype) x |top-1|),
the unit of taps.eval.ties.TIE_EPS, and of the raw difference.
"""

from __future__ import annotations

import argparse

import torch

from taps.data.benchmarks import load_benchmark
from taps.data.template import prompt_ids
from taps.engine.decoder import vanilla_generate
from taps.models.linear import fast_linear
from taps.models.target import load_smollm2
from taps.paths import default_cache_dir, default_data_dir


@torch.no_grad()
def gap_noise(model, prompt: list[int], tokens: list[int], chunk: int) -> list[tuple[float, float]]:
    """(|gap difference|, |top-1|) at each generated position, step vs chunked forwards."""
    seq = prompt + tokens
    out = []
    step_cache = model.new_cache(len(seq) + 1)
    step_logits = [model.logits(model(torch.tensor([prompt]), cache=step_cache)[0, -1])]
    for t in tokens[:-1]:
        step_logits.append(model.logits(model(torch.tensor([[t]]), cache=step_cache)[0, -1]))
    cache = model.new_cache(len(seq) + 1)
    rows = [model.logits(model(torch.tensor([prompt]), cache=cache)[0, -1:])]
    for i in range(0, len(tokens) - 1, chunk):
        rows.append(model.logits(model(torch.tensor([tokens[i : i + chunk]]), cache=cache)[0]))
    chunked = torch.cat(rows)[: len(step_logits)]
    for s, c in zip(step_logits, chunked, strict=True):
        a, b = s.float().topk(2).indices.tolist()
        d = abs(float(s[a] - s[b]) - float(c[a] - c[b]))
        out.append((d, abs(float(s[a]))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    target = load_smollm2(default_cache_dir())
    qs = [*load_benchmark("gsm8k", default_data_dir(), args.prompts // 2),
          *load_benchmark("mt_bench", default_data_dir(), args.prompts - args.prompts // 2)]  # fmt: skip
    prompts = [prompt_ids(target.tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    print("| dtype | positions | unit eps x abs(top-1) | median | 99% | 99.9% | max | max raw |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model = target.model.to(dtype)
        eps = torch.finfo(dtype).eps
        pairs = []
        with fast_linear():
            for p in prompts:
                toks = vanilla_generate(model, p, args.tokens, set()).tokens
                pairs += gap_noise(model, p, toks, args.chunk)
        units = torch.tensor([d / (eps * max(m, 1.0)) for d, m in pairs], dtype=torch.float64)
        raw = torch.tensor([d for d, _ in pairs], dtype=torch.float64)
        q = [float(units.quantile(x)) for x in (0.5, 0.99, 0.999)]
        print(f"| {str(dtype).removeprefix('torch.')} | {len(pairs)} | {eps:.2e} | {q[0]:.2f} | "
              f"{q[1]:.2f} | {q[2]:.2f} | {float(units.max()):.2f} | {float(raw.max()):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
