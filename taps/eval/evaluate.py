"""Decode a benchmark with one decoder and summarise it as one results row."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from taps.data.benchmarks import BenchPrompt
from taps.data.template import prompt_ids
from taps.engine.decoder import SpeculativeDecoder, check_context, vanilla_generate
from taps.engine.stats import Generation
from taps.eval.metrics import acceptance_by_depth, bootstrap_tau, node_stats, routing_shares, tau
from taps.eval.ties import compare
from taps.memory import PeakMemory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TurnRecord:
    question_id: str
    turn: int  # 0-based here; outputs.jsonl counts from 1
    gen: Generation
    lossless: dict | None = None
    prompt: str = ""  # this turn's user message
    text: str = ""  # the decoded answer
    source: str = ""  # the benchmark the prompt came from, in a mixed stream
    vanilla: tuple[int, float] | None = None  # (tokens, seconds) of vanilla decoding, if run


@dataclass
class BenchRun:
    bench: str
    temperature: float
    turns: list[TurnRecord] = field(default_factory=list)
    wall_time_s: float = 0.0
    peak_memory: dict = field(default_factory=dict)  # the whole cell's; a source row shares it


def run_bench(
    decoder: SpeculativeDecoder,
    tokenizer: PreTrainedTokenizerBase,
    bench: str,
    prompts: list[BenchPrompt],
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    verify_lossless: bool = False,
    near_tie: float | None = None,
    record_nodes: bool = True,
) -> BenchRun:
    """Multi-turn prompts are decoded truly multi-turn: turn k's prompt holds the model's own
    earlier answers (each decoder keeps its own history)."""
    run = BenchRun(bench=bench, temperature=temperature)
    gen_rng = torch.Generator().manual_seed(seed)
    if hasattr(decoder.proposer, "new_session"):  # an online router learns within a cell only
        decoder.proposer.new_session()
    t0 = time.perf_counter()
    bar = tqdm(prompts, desc=f"{bench} T={temperature:g}", unit="q", leave=False)
    with PeakMemory(decoder.target.lm_head.weight.device, interval_s=0.02) as mem:
        for q in bar:
            run.turns += _question(decoder, tokenizer, bench, q, max_new_tokens, temperature,
                                   top_p, gen_rng, verify_lossless, near_tie, record_nodes)  # fmt: skip
            bar.set_postfix(tau=f"{tau([t.gen for t in run.turns]):.2f}")
    run.peak_memory = mem.as_dict()
    run.wall_time_s = time.perf_counter() - t0
    return run


def _question(
    decoder: SpeculativeDecoder,
    tokenizer: PreTrainedTokenizerBase,
    bench: str,
    q: BenchPrompt,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    gen_rng: torch.Generator,
    verify_lossless: bool,
    near_tie: float | None,
    record_nodes: bool,
) -> list[TurnRecord]:
    """Every turn of one question, each prompt holding the decoder's own earlier answers;
    vanilla decoding of the same prompt beside it when checking losslessness (from the same
    history, so a divergence in turn 1 does not make turn 2 a comparison of two contexts)."""
    spec_hist: list[dict] = []
    out = []
    for k, turn in enumerate(q.turns):
        spec_hist.append({"role": "user", "content": turn})
        ids = prompt_ids(tokenizer, spec_hist)
        # here, unlike in generate, the error can name the question
        check_context(decoder.target, len(ids), max_new_tokens,
                      f"{bench} question_id {q.question_id!r}, turn {k + 1}")  # fmt: skip
        gen = decoder.generate(ids, max_new_tokens, temperature, top_p, gen_rng, record_nodes)
        rec = TurnRecord(q.question_id, k, gen, prompt=turn, text=_text(tokenizer, gen.tokens),
                         source=q.source)  # fmt: skip
        spec_hist.append({"role": "assistant", "content": rec.text})
        if verify_lossless and temperature <= 0:
            ref = vanilla_generate(decoder.target, ids, max_new_tokens, decoder.eos_ids)
            rec.lossless = compare(gen, ref, decoder.target.lm_head.weight.dtype, near_tie)
            rec.vanilla = (len(ref.tokens), ref.wall_time_s)
        out.append(rec)
    return out


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def outputs(run: BenchRun) -> list[dict]:
    """What was generated, per prompt and turn: the readable side of a row (outputs.jsonl)."""
    return [
        {
            "bench": run.bench,
            "temperature": run.temperature,
            "question_id": t.question_id,
            "turn": t.turn + 1,
            "prompt": t.prompt,
            "text": t.text,
            "tokens": t.gen.tokens,
            "tau": round(tau([t.gen]), 4),
            "identical_to_vanilla": None if t.lossless is None else t.lossless["identical"],
            **({"source": t.source} if t.source else {}),
        }
        for t in run.turns
    ]


def summarise(
    run: BenchRun, max_depth: int, drafters: list[str] | None = None, by_source: bool = True
) -> dict:
    """One results row; `drafters` (in order) for routing shares, `by_source` for a stream."""
    gens = [t.gen for t in run.turns]
    new = sum(len(g.tokens) for g in gens)
    decode_time = sum(g.wall_time_s for g in gens)
    per_q: dict[str, list[Generation]] = {}
    for t in run.turns:
        per_q.setdefault(t.question_id, []).append(t.gen)
    row = {
        "bench": run.bench,
        "temperature": run.temperature,
        "tau": round(tau(gens), 4),
        "tau_ci95": _round(bootstrap_tau([_totals(v) for v in per_q.values()])),
        "prompts": len(per_q),
        "turns": len(gens),
        "new_tokens": new,
        "cycles": sum(len(g.cycles) for g in gens),
        "target_forwards": sum(g.target_forwards for g in gens),
        "wall_time_s": round(decode_time, 3),
        "tokens_per_s": round(new / max(decode_time, 1e-9), 2),
        "peak_memory": run.peak_memory,
        "tree_tokens_per_cycle": _mean([c.tree_size for g in gens for c in g.cycles]),
        "draft_forwards_per_cycle": _mean([c.draft_forwards for g in gens for c in g.cycles]),
        "phase_ms_per_cycle": phase_ms([g.phase_s for g in gens], sum(len(g.cycles) for g in gens)),
        "tau_per_question": {k: round(tau(v), 4) for k, v in per_q.items()},
        # (new tokens, target forwards) per question: enough to recompute any aggregate.
        "per_question": {k: _totals(v) for k, v in per_q.items()},
        "seconds_per_question": {
            k: round(sum(g.wall_time_s for g in v), 3) for k, v in per_q.items()
        },
        "acceptance_by_depth": [round(x, 4) for x in acceptance_by_depth(gens, max_depth)],
        **{k: (round(v, 4) if v is not None else None) for k, v in node_stats(gens).items()},
    }
    shares = routing_shares(per_q, drafters or ["drafter"])
    if shares is not None:
        row["routing_shares"] = shares
        row["route_trajectory"] = route_trajectory(run.turns)
    sources = list(dict.fromkeys(t.source for t in run.turns if t.source))
    if sources and by_source:  # a mixed stream: the same summary per source (bench=stream)
        row["by_source"] = {s: _source_row(run, s, max_depth, drafters) for s in sources}
    vanilla = [t.vanilla for t in run.turns if t.vanilla is not None]
    if vanilla:  # vanilla decoding ran turn by turn beside ours (eval.verify_lossless)
        v_tps = sum(n for n, _ in vanilla) / max(sum(s for _, s in vanilla), 1e-9)
        row["vanilla_tokens_per_s"] = round(v_tps, 2)
        row["speedup_vs_vanilla"] = round(row["tokens_per_s"] / max(v_tps, 1e-9), 3)
    lossless = _lossless(run.turns)
    if lossless is not None:
        row["lossless"] = lossless
    return row


def _lossless(turns: list[TurnRecord]) -> dict | None:
    """The identity check against vanilla decoding over the turns that ran it."""
    checks = [t.lossless for t in turns if t.lossless is not None]
    if not checks:
        return None
    bad = [
        dict(question_id=t.question_id, turn=t.turn, **t.lossless)
        for t in turns
        if t.lossless and not t.lossless["identical"]
    ]
    return {
        "checked_turns": len(checks),
        "identical_fraction": round(sum(c["identical"] for c in checks) / len(checks), 4),
        "divergences": bad,
        "all_divergences_near_ties": all(b["near_tie"] for b in bad),
    }


def _source_row(run: BenchRun, source: str, max_depth: int, drafters: list[str] | None) -> dict:
    """The summary of a stream's turns from one source (its trajectory stays the stream's)."""
    turns = [t for t in run.turns if t.source == source]
    sub = BenchRun(run.bench, run.temperature, turns, peak_memory=run.peak_memory)
    row = summarise(sub, max_depth, drafters, by_source=False)
    row.pop("route_trajectory", None)
    return row


def route_trajectory(turns: list[TurnRecord], points: int = 600) -> dict:
    """Every drafter's routing weight (score) per cycle over the session, with the source of
    the prompt each cycle belongs to; thinned to about `points` cycles for the plot."""
    cycles = [(t.source or t.question_id, c.route_scores) for t in turns for c in t.gen.cycles]
    cycles = [(s, r) for s, r in cycles if r]
    step = max(1, len(cycles) // points)
    kept = list(range(0, len(cycles), step))
    return {
        "cycle": kept,
        "source": [cycles[i][0] for i in kept],
        "scores": [[round(float(x), 4) for x in cycles[i][1]] for i in kept],
    }


def phase_ms(phase_s: list[dict[str, float]], cycles: int) -> dict[str, float]:
    """Wall time of each phase of the loop (draft, verify, accept, commit) per cycle, in ms,
    from the `phase_s` of decodings that ran `cycles` cycles in all: where a strategy's time
    goes. Prefill is per turn, not per cycle, and left out."""
    phases = sorted({p for s in phase_s for p in s} - {"prefill"})
    return {p: round(1e3 * sum(s.get(p, 0.0) for s in phase_s) / max(cycles, 1), 2) for p in phases}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


def _totals(gens: list[Generation]) -> list[int]:
    return [sum(len(g.tokens) for g in gens), sum(g.target_forwards for g in gens)]


def _round(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
