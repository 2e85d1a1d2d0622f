"""Wall-clock speed of decoding methods on the same prompts in one process (issue 7).

A method is a function (prompt ids, max new tokens, torch generator) -> Decoded. Every method
decodes every prompt in turn, so machine noise hits all of them alike; speedups are medians
over prompts of per-prompt tokens/s ratios; `paired_ratios` adds a geometric mean with a
bootstrap interval over prompts against a chosen method.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from taps.data.template import prompt_ids
from taps.engine.decoder import SpeculativeDecoder, aux_layers, vanilla_generate
from taps.engine.stats import Generation
from taps.engine.tree import verification_inputs
from taps.engine.verify import accept_greedy, accept_sampling
from taps.eval.evaluate import phase_ms
from taps.eval.grid import load_prompts
from taps.eval.metrics import percentile_interval
from taps.eval.ties import compare
from taps.memory import PeakMemory
from taps.models.linear import fast_linear
from taps.models.llama import Llama

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Decoded:
    tokens: list[int]
    tau: float | None = None  # speculative methods: new tokens per target forward
    cycles: int = 0
    phase_s: dict[str, float] = field(default_factory=dict)
    # Greedy only: the target's top-1 logit and top-2 gap where each token was chosen, to tell
    # a divergence from our vanilla loop at a floating-point near-tie from a wrong decoding.
    top1_logits: list[float] | None = None
    top2_gaps: list[float] | None = None


Method = Callable[[list[int], int, torch.Generator], Decoded]

BASELINE = "hf_generate"  # (a): what a user gets without us
VANILLA = "ours_vanilla"  # (c): the same model and cache as our speculative decoding


def first_turns(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list, list[list[int]]]:
    """The questions of the first benchmark in cfg.bench (up to bench.limit; `stream`: the
    mixed session of bench=stream, in its order) and the chat prompt ids of their first turns."""
    name = cfg.bench.benchmarks[0]
    questions = load_prompts([name], cfg.paths.data_dir, cfg.bench.limit, cfg.bench.get("path"),
                             cfg.bench.get("stream"))[name]  # fmt: skip
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in questions]
    return questions, prompts


def hf_methods(
    hf: PreTrainedModel, eos_token_id: int, temperature: float, prompt_lookup: int = 10
) -> dict:
    """(a) transformers generate and (b) prompt lookup (greedy only in transformers)."""
    sample = {"do_sample": temperature > 0}
    if temperature > 0:
        sample.update(temperature=temperature, top_k=0)

    def generate(ids: list[int], n: int, gen: torch.Generator, **extra) -> Decoded:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        x = torch.tensor([ids], device=hf.device)
        out = hf.generate(x, max_new_tokens=n, pad_token_id=eos_token_id, **sample, **extra)
        return Decoded(out[0, len(ids) :].tolist())

    methods: dict[str, Method] = {BASELINE: generate}
    if temperature <= 0:
        methods["hf_prompt_lookup"] = lambda ids, n, gen: generate(
            ids, n, gen, prompt_lookup_num_tokens=prompt_lookup
        )
    return methods


def our_methods(
    target: Llama, decoders: dict[str, SpeculativeDecoder], eos: set[int], temperature: float
) -> dict:
    """(c) our vanilla loop and (d) our speculative decoders, named."""

    def logits(g: Generation) -> dict:
        return {} if temperature > 0 else {"top1_logits": g.top1_logits, "top2_gaps": g.top2_gaps}

    def vanilla(ids: list[int], n: int, gen: torch.Generator) -> Decoded:
        g = vanilla_generate(target, ids, n, eos, temperature, 1.0, gen)
        return Decoded(g.tokens, **logits(g))

    def speculative(dec: SpeculativeDecoder) -> Method:
        def run(ids: list[int], n: int, gen: torch.Generator) -> Decoded:
            g = dec.generate(ids, n, temperature, 1.0, gen, record_nodes=False)
            return Decoded(g.tokens, g.tau, len(g.cycles), g.phase_s, **logits(g))

        return run

    return {VANILLA: vanilla, **{name: speculative(d) for name, d in decoders.items()}}


def measure(
    prompts: list[list[int]],
    methods: dict[str, Method],
    max_new_tokens: int,
    seed: int,
    device: torch.device,
    warmup_tokens: int = 8,
    progress: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Decode every prompt with every method (after one short warm-up call each); per prompt
    and method: tokens, seconds, tau, cycles, loop phases and peak memory."""
    for run in methods.values():  # first calls pay one-off allocation and dispatch costs
        run(prompts[0], warmup_tokens, torch.Generator().manual_seed(seed))
    records = []
    for i, ids in enumerate(prompts):
        rec: dict = {"prompt": i, "prompt_tokens": len(ids)}
        for name, run in methods.items():
            gen = torch.Generator().manual_seed(seed + i)
            with PeakMemory(device) as mem:
                t = time.perf_counter()
                out = run(ids, max_new_tokens, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                secs = time.perf_counter() - t
            rec[name] = {"tokens": out.tokens, "s": secs, "tau": out.tau, "cycles": out.cycles,
                         "phase_s": out.phase_s, "memory": mem.as_dict()}  # fmt: skip
            if out.top2_gaps is not None:
                rec[name].update(top1_logits=out.top1_logits, top2_gaps=out.top2_gaps)
        records.append(rec)
        if progress is not None:
            progress(i, rec)
    return records


def _names(records: list[dict]) -> list[str]:
    """The methods a run's records hold (each a dict per prompt)."""
    return [k for k, v in records[0].items() if isinstance(v, dict)]


def _tps(r: dict, name: str) -> float:
    return len(r[name]["tokens"]) / r[name]["s"]


def paired_ratios(records: list[dict], ref: str, samples: int = 2000, seed: int = 0) -> dict:
    """Per other method: `ref`'s tokens/s over its, prompt by prompt (both decoded the same
    prompts, interleaved): geometric mean with a bootstrap 95% interval resampling prompts,
    median, and on how many prompts `ref` was faster."""
    names = _names(records)
    if ref not in names:
        raise ValueError(f"speed.ref={ref!r}: not a measured method (measured: {names})")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(records), (samples, len(records)), generator=gen)
    out = {}
    for n in (n for n in names if n != ref):
        logs = torch.tensor(
            [math.log(_tps(r, ref) / _tps(r, n)) for r in records], dtype=torch.float64
        )
        lo, hi = percentile_interval(logs[idx].mean(1).exp())
        out[n] = {
            "geo_mean": round(float(logs.mean().exp()), 3),
            "ci95": [round(lo, 3), round(hi, 3)] if len(records) > 1 else None,
            "median": round(statistics.median(logs.exp().tolist()), 3),
            "faster_on": int((logs > 0).sum()),
        }
    return {"ref": ref, "prompts": len(records), "methods": out}


def speed_summary(
    records: list[dict],
    temperature: float,
    ref: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Per method: median tokens/s, median per-prompt speedups against (a) and (c), median tau,
    outputs identical to (a) and (c) (greedy only), ms per cycle by phase, and peak memory;
    with `ref`, also every method paired against it (`paired_ratios`); with the target's
    `dtype`, each greedy divergence from (c) classified as a near-tie or not (`near_ties`)."""
    names = _names(records)
    med = statistics.median
    out = {}
    for n in names:
        row = {"tokens_per_s": round(med([_tps(r, n) for r in records]), 2)}
        for base, key in ((BASELINE, "vs_hf_generate"), (VANILLA, "vs_ours_vanilla")):
            if base in records[0]:
                row[key] = round(med([_tps(r, n) / _tps(r, base) for r in records]), 3)
        if records[0][n]["tau"] is not None:
            row["tau"] = round(med([r[n]["tau"] for r in records]), 3)
            cycles = sum(r[n]["cycles"] for r in records)
            row["ms_per_cycle"] = phase_ms([r[n]["phase_s"] for r in records], cycles)
        # Greedy identity against transformers and against our own vanilla loop in the same
        # precision: in bf16 the two references themselves differ (other kernels, other sums).
        for base, key in (
            (BASELINE, "identical_to_hf_generate"),
            (VANILLA, "identical_to_ours_vanilla"),
        ):
            if temperature <= 0 and base in records[0]:
                row[key] = sum(r[n]["tokens"] == r[base]["tokens"] for r in records)
        if temperature <= 0 and dtype is not None and "top2_gaps" in records[0][n]:
            row.update(near_ties(records, n, dtype))
        row["peak_memory_mb"] = max(r[n]["memory"]["peak_mb"] for r in records)
        row["extra_memory_mb"] = max(r[n]["memory"]["extra_mb"] for r in records)
        out[n] = row
    summary = {"temperature": temperature, "prompts": len(records), "methods": out}
    if ref is not None:
        summary["paired"] = paired_ratios(records, ref)
    return summary


def near_ties(records: list[dict], name: str, dtype: torch.dtype) -> dict:
    """Of the prompts where greedy method `name` left our vanilla loop, how many did so at a
    near-tie of the target's top-2 logits (taps/eval/ties.py), and the others in full."""
    if name == VANILLA or "top2_gaps" not in records[0].get(VANILLA, {}):
        return {}
    ties, bad = 0, []
    for r in records:
        if r[name]["tokens"] == r[VANILLA]["tokens"]:
            continue
        d = compare(_generation(r[name]), _generation(r[VANILLA]), dtype, None)
        ties += d["near_tie"]
        if not d["near_tie"]:
            bad.append({"prompt": r["prompt"], "question_id": r.get("question_id"), **d})
    return {"near_ties_vs_ours_vanilla": ties, "not_near_ties_vs_ours_vanilla": len(bad),
            "divergences_not_near_ties": bad}  # fmt: skip


def _generation(m: dict) -> Generation:
    return Generation(m["tokens"], 0, 0.0, top2_gaps=m["top2_gaps"], top1_logits=m["top1_logits"])


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 0) -> float:
    """Median wall time of `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
@fast_linear()  # the kernels the decoders use, so unit costs match the decoding they explain
def unit_costs(
    decoder: SpeculativeDecoder, prompt: list[int], temperature: float = 0.0, reps: int = 5
) -> dict:
    """Seconds of one vanilla step, one tree draft and one verification (target forward plus
    acceptance, with the decoder's own LM-head rule) after the prompt's prefill, at the run's
    temperature: a drawn tree (`TreeSpec.sampled`) is drafted and accepted as it is decoded."""
    target, proposer = decoder.target, decoder.proposer
    dev = target.lm_head.weight.device
    gen = torch.Generator(device=dev).manual_seed(0)
    if hasattr(proposer, "set_sampling"):  # else it drafts whatever it last decoded at
        proposer.set_sampling(temperature, gen)
    cache = target.new_cache(len(prompt) + 256)
    ids = torch.tensor([prompt], device=dev)
    states = target.states(ids, cache=cache, capture=aux_layers(proposer))[0]
    root = int(target.logits(states.final[-1]).argmax())
    proposer.start(states, torch.tensor(prompt[1:] + [root], device=dev), len(prompt) + 256)
    prefix = cache.length
    tree = proposer.propose()
    tokens, pos, mask = verification_inputs(tree, prefix, dev)

    def verify() -> None:
        logits = decoder.tree_logits(tree, target(tokens, pos, cache, mask)[0])
        if temperature > 0:
            accept_sampling(tree, logits, temperature, 1.0, gen)
        else:
            accept_greedy(tree, logits)
        cache.truncate(prefix)

    def step() -> None:
        target.logits(target(tokens[:, :1], pos[:, :1], cache)[0, -1])
        cache.truncate(prefix)

    return {
        "step_s": median_seconds(step, reps),
        "draft_s": median_seconds(proposer.propose, reps),
        "verify_s": median_seconds(verify, reps),
        "tree_tokens": len(tree),
    }
