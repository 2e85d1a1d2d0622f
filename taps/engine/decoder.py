"""The decoding loop shared by every strategy: prefill, then draft -> verify -> accept -> commit.

A strategy is a `Proposer` (one drafter, several routed drafters, merged trees ...); the loop,
the target's KV cache and the acceptance rules stay here, once.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import Tensor

from taps.engine.stats import CycleStats, Generation
from taps.engine.tree import DraftTree, verification_inputs
from taps.engine.verify import (
    NodeLogits,
    accept_greedy,
    accept_sampling,
    argmax_rows,
    target_probs,
)
from taps.models.heads import AnyHead
from taps.models.linear import fast_linear
from taps.models.llama import Llama, TargetStates


class Proposer(Protocol):
    max_tree: int  # most tokens a proposed tree holds, root included

    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        """Prefill on the prompt's target states (n positions) and prompt[1:] + root. A
        proposer that must read prompt[0] too defines `set_prompt(prompt)`, which the decoder
        calls before `start` (and a `DrafterGroup` forwards to its drafters)."""

    def propose(self) -> DraftTree:
        """A tree rooted at the current root, built from the committed state."""

    def commit(self, states: TargetStates, next_tokens: Tensor) -> None:
        """Catch up on the accepted path's target states and the tokens that followed them."""

    @property
    def heads(self) -> list[AnyHead]:
        """The draft heads it drafts with, in order (cast for serving, exported, counted)."""


def _pick(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(argmax_rows(logits))
    p = target_probs(logits, temperature, top_p)
    return int(torch.multinomial(p.float(), 1, generator=gen))


def aux_layers(proposer: Proposer) -> tuple[int, ...]:
    """The target layers whose hidden streams the proposer's heads read (EAGLE-3), sorted."""
    return tuple(sorted({i for h in proposer.heads for i in getattr(h, "aux_layers", ())}))


def _finite(states: TargetStates, where: str) -> TargetStates:
    """The target's hidden states, refused when non-finite: NaN logits would make every draft
    "accepted" (NaN comparisons) and report a meaningless tau."""
    if not torch.isfinite(states.final).all():
        raise FloatingPointError(
            f"the target's hidden states are non-finite at {where}: its weights are damaged or "
            "its dtype overflows (try eval.dtype=float32)"
        )
    return states


def _extend(out: list[int], new: list[int], eos_ids: set[int], limit: int) -> bool:
    """Append a cycle's tokens to `out` up to the first EOS or the token limit; report whether
    decoding is over. Touches only the new tokens: no per-cycle work grows with the output."""
    for t in new:
        if len(out) >= limit:
            return True
        out.append(t)
        if t in eos_ids:
            return True
    return len(out) >= limit


def check_context(target: Llama, prompt_len: int, max_new_tokens: int, what: str = "") -> None:
    """Fail up front, with the numbers, instead of deep in the KV cache or rotary code: an
    empty prompt has no position to predict from, and positions past the target's context
    (config max_position_embeddings) are outside what it was trained on."""
    where = f" ({what})" if what else ""
    if prompt_len <= 0:
        raise ValueError(f"empty prompt{where}: nothing to decode from")
    ctx = getattr(target.config, "max_position_embeddings", None)
    if ctx is not None and prompt_len + max_new_tokens > ctx:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the context of the target ({ctx} tokens, "
            f"max_position_embeddings){where}: lower max_new_tokens or shorten the prompt"
        )


def _record_top2(gen: Generation, rows: Tensor) -> None:
    """Top-1 logit and top-2 gap of the rows that chose this cycle's tokens (greedy)."""
    top = rows.topk(2, dim=-1).values.float()
    gen.top1_logits += top[:, 0].tolist()
    gen.top2_gaps += (top[:, 0] - top[:, 1]).tolist()


class _Phases:
    """Wall time per phase of the loop. No device synchronisation: on a GPU, kernels still in
    flight are billed to whichever phase waits for them (synchronising would slow decoding)."""

    def __init__(self, out: dict[str, float]) -> None:
        self.out = out
        self.t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.out[phase] = self.out.get(phase, 0.0) + now - self.t
        self.t = now


class SpeculativeDecoder:
    def __init__(
        self,
        target: Llama,
        proposer: Proposer,
        eos_ids: set[int],
        lazy_logits_from: int | None = None,
    ) -> None:
        self.target = target
        self.proposer = proposer
        self.eos_ids = eos_ids
        # Trees of at least this many tokens get target logits only at the nodes acceptance
        # visits (one LM-head call per level it walks); smaller ones get all rows in one call.
        # Where matmuls are bandwidth-bound (CPU, few rows) one call is cheaper; where they
        # are compute-bound (wide trees on a CPU) the lazy walk is (experiments/README.md).
        self.lazy_logits_from = lazy_logits_from

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        record_nodes: bool = True,
    ) -> Generation:
        with torch.no_grad(), fast_linear():
            return self._generate(prompt, max_new_tokens, temperature, top_p, generator,
                                  record_nodes)  # fmt: skip

    def _generate(self, prompt, max_new_tokens, temperature, top_p, generator, record_nodes):
        check_context(self.target, len(prompt), max_new_tokens)
        t0 = time.perf_counter()
        dev = self.target.lm_head.weight.device
        gen = Generation(tokens=[], target_forwards=1, wall_time_s=0.0)
        tick = _Phases(gen.phase_s)
        max_len = len(prompt) + max_new_tokens + 1
        cache = self.target.new_cache(max_len + self.proposer.max_tree)
        ids = torch.tensor([prompt], device=dev)
        layers = aux_layers(self.proposer)
        feats = _finite(self.target.states(ids, cache=cache, capture=layers)[0], "prefill")
        first = self.target.logits(feats.final[-1])
        root = _pick(first, temperature, top_p, generator)
        if temperature <= 0:
            _record_top2(gen, first[None])
        out: list[int] = []
        done = _extend(out, [root], self.eos_ids, max_new_tokens)
        if not done:
            # Drafters that draw their trees (TreeSpec.sampled) draw at this temperature with
            # this generator; online routers score drafters differently when sampling.
            if hasattr(self.proposer, "set_sampling"):
                self.proposer.set_sampling(temperature, generator)
            if hasattr(self.proposer, "set_prompt"):  # proposers that read prompt[0] too
                self.proposer.set_prompt(prompt)
            self.proposer.start(feats, torch.tensor(prompt[1:] + [root], device=dev), max_len)
        tick("prefill")
        while not done:
            tree = self.proposer.propose()
            tick("draft")
            prefix = cache.length
            tokens, positions, mask = verification_inputs(tree, prefix, dev)
            states = self.target.states(tokens, positions, cache, mask, layers)
            feats = _finite(states[0], "verification")
            tick("verify")
            logits = self.tree_logits(tree, feats.final)
            gen.target_forwards += 1
            if temperature <= 0:
                path, bonus = accept_greedy(tree, logits)
                _record_top2(gen, logits(path) if isinstance(logits, NodeLogits) else logits[path])
            else:
                path, bonus = accept_sampling(tree, logits, temperature, top_p, generator)
            cache.keep(prefix, torch.tensor(path))
            accepted = tree.tokens[path[1:]].tolist()
            gen.cycles.append(self._stats(tree, path, record_nodes))
            done = _extend(out, accepted + [bonus], self.eos_ids, max_new_tokens)
            tick("accept")
            if not done:
                nxt = torch.tensor(accepted + [bonus], device=dev)
                self.proposer.commit(feats[path], nxt)
                tick("commit")
        gen.tokens = out
        gen.wall_time_s = time.perf_counter() - t0
        return gen

    def tree_logits(self, tree: DraftTree, feats: Tensor) -> Tensor | NodeLogits:
        """The target's logits for a verified tree: all rows in one LM-head call, or lazily
        per visited node for trees of at least `lazy_logits_from` tokens."""
        lazy = self.lazy_logits_from is not None and len(tree) >= self.lazy_logits_from
        return NodeLogits(feats, self.target.logits) if lazy else self.target.logits(feats)

    @staticmethod
    def _stats(tree: DraftTree, path: list[int], record_nodes: bool) -> CycleStats:
        s = CycleStats(
            accepted=len(path) - 1,
            tree_size=len(tree),
            drafter=tree.drafter,
            draft_forwards=tree.draft_forwards,
            route_scores=tree.route_scores,
        )
        if record_nodes:
            on_path = set(path)
            s.node_confidence = tree.scores[1:].exp().tolist()
            s.node_entropy = tree.entropies[1:].tolist()
            s.node_depth = tree.depths[1:]
            s.node_accepted = [i in on_path for i in range(1, len(tree))]
        return s


@torch.no_grad()
@fast_linear()
def vanilla_generate(
    target: Llama,
    prompt: list[int],
    max_new_tokens: int,
    eos_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Generation:
    """Token-by-token decoding with the same model and cache: the baseline and the reference
    for losslessness. Records the target's top-2 logit gap at every step."""
    check_context(target, len(prompt), max_new_tokens)
    t0 = time.perf_counter()
    dev = target.lm_head.weight.device
    cache = target.new_cache(len(prompt) + max_new_tokens + 1)
    x = torch.tensor([prompt], device=dev)
    gen = Generation(tokens=[], target_forwards=0, wall_time_s=0.0)
    while True:
        logits = target.logits(target(x, cache=cache)[0, -1])
        gen.target_forwards += 1
        top2 = logits.topk(2).values.float()
        gen.top2_gaps.append(float(top2[0] - top2[1]))
        gen.top1_logits.append(float(top2[0]))
        tok = _pick(logits, temperature, top_p, generator)
        gen.tokens.append(tok)
        if tok in eos_ids or len(gen.tokens) >= max_new_tokens:
            break
        x = torch.tensor([[tok]], device=dev)
    gen.wall_time_s = time.perf_counter() - t0
    return gen
