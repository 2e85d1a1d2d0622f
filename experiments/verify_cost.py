"""What one verification forward costs on this machine as the tree grows, and when computing the
target's logits lazily (only at the nodes acceptance walks through) beats one LM-head call for
the whole tree (issue 7). Uses SmolLM2 and a random tree of each size; no drafter needed.

    python experiments/verify_cost.py [--prefix 200] [--walk 3] [--reps 7]

Prints, per tree size and for the default (MKL) and oneDNN linear kernels (taps/models/linear.py):
the body forward, eager logits (all rows, one call), lazy logits (one call per level of a walk
`--walk` deep), and forward + eager logits relative to one decode step with the same kernels.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from taps.engine.tree import DraftTree, verification_inputs
from taps.engine.verify import NodeLogits, accept_greedy
from taps.models.linear import fast_linear
from taps.models.llama import KVCache, Llama
from taps.models.target import load_smollm2
from taps.paths import default_cache_dir
from taps.study.speed import median_seconds


def random_tree(n: int, width: int, gen: torch.Generator) -> DraftTree:
    """n nodes, each parent chosen among the previous `width` nodes (a bushy tree)."""
    parents = [-1] + [max(0, i - 1 - int(torch.randint(0, width, (1,), generator=gen)))
                      for i in range(1, n)]  # fmt: skip
    z = torch.zeros(n, dtype=torch.float64)
    return DraftTree(torch.randint(0, 1000, (n,), generator=gen), parents, z, z, z)


def median_ms(fn: Callable[[], object], reps: int) -> float:
    return 1e3 * median_seconds(fn, reps, warmup=1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--walk", type=int, default=3, help="levels a lazy walk computes")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sizes", default="1,2,4,6,8,10,12,16,24,32,48,60")
    args = ap.parse_args()
    model = load_smollm2(default_cache_dir()).model
    gen = torch.Generator().manual_seed(0)
    cache = model.new_cache(args.prefix + 128)
    model(torch.randint(0, 1000, (1, args.prefix), generator=gen), cache=cache)
    prefix = cache.length
    print(f"threads {torch.get_num_threads()}, prefix {prefix}, lazy walk {args.walk} levels")
    print("| kernels | tokens | forward ms | + eager logits ms | + lazy logits ms | eager / step |")
    print("|---|---|---|---|---|---|")
    for onednn in (False, True):
        step = None
        with fast_linear(onednn):
            kernels = "oneDNN" if onednn else "default"
            for n in [int(s) for s in args.sizes.split(",")]:
                f, eager, lz = costs(model, cache, random_tree(n, 3, gen), args.walk, args.reps)
                step = step or f + eager
                print(f"| {kernels} | {n} | {f:.1f} | {eager:.1f} | {lz:.1f} | "
                      f"{(f + eager) / step:.2f} |", flush=True)  # fmt: skip


def costs(
    model: Llama, cache: KVCache, tree: DraftTree, walk: int, reps: int
) -> tuple[float, float, float]:
    """ms of the body forward over the tree, of eager logits + acceptance, of a lazy walk."""
    prefix = cache.length
    tokens, pos, mask = verification_inputs(tree, prefix, torch.device("cpu"))
    h = model(tokens, pos, cache, mask)[0]
    cache.truncate(prefix)

    def forward() -> None:
        model(tokens, pos, cache, mask)
        cache.truncate(prefix)

    def lazy() -> None:  # one row per level, as a walk `walk` deep asks for them
        rows = NodeLogits(h, model.logits)
        for i in range(min(walk, len(tree))):
            rows([i]).argmax(-1).tolist()

    eager = median_ms(lambda: accept_greedy(tree, model.logits(h)), reps)
    return median_ms(forward, reps), eager, median_ms(lazy, reps)


if __name__ == "__main__":
    main()
