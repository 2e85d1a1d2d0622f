"""Greedy speculative decoding must reproduce vanilla greedy decoding token for token."""

from __future__ import annotations

import pytest
import torch

import taps.engine.decoder as decoder_mod
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.engine.tree import DraftTree, verification_inputs
from taps.engine.verify import NodeLogits, accept_greedy, argmax_rows
from taps.models.draft_head import DraftHead
from tests.helpers import NoisyOracle, TopKOracle


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(4, 30, (), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def run_oracle(tiny, n: int = 20, max_new: int = 48):
    model = tiny.model
    same, taus = 0, []
    for i, p in enumerate(prompts(n, model.config.vocab_size)):
        oracle = NoisyOracle(model, depth=4, noise=0.3, seed=i)
        spec = SpeculativeDecoder(model, oracle, tiny.eos_ids).generate(p, max_new)
        ref = vanilla_generate(model, p, max_new, tiny.eos_ids)
        same += spec.tokens == ref.tokens
        taus.append(spec.tau)
    return same, taus


def test_greedy_lossless_float64_oracle(tiny64):
    same, taus = run_oracle(tiny64)
    assert same == 20, f"only {same}/20 prompts identical"
    # The oracle must actually get multi-token acceptances, or the test proves little.
    assert sum(taus) / len(taus) > 2.0


def _rows(logits: torch.Tensor | NodeLogits) -> NodeLogits:
    return logits if isinstance(logits, NodeLogits) else NodeLogits(logits)


def _accept_one_too_many(tree: DraftTree, logits: torch.Tensor | NodeLogits):
    """Broken: also accepts the first draft token after the matching prefix (the classic
    off-by-one of counting the mismatch as accepted)."""
    path, _ = accept_greedy(tree, logits)
    kids = [i for i, p in enumerate(tree.parents) if p == path[-1]]
    if kids:
        path = path + [kids[0]]
    return path, int(_rows(logits)([path[-1]]).argmax())


def _bonus_off_by_one(tree: DraftTree, logits: torch.Tensor | NodeLogits):
    """Broken: takes the bonus token from the last accepted node's parent."""
    path, _ = accept_greedy(tree, logits)
    return path, int(_rows(logits)([path[-2] if len(path) > 1 else 0]).argmax())


@pytest.mark.parametrize("broken", [_accept_one_too_many, _bonus_off_by_one])
def test_exactness_check_catches_broken_rules(tiny64, monkeypatch, broken):
    monkeypatch.setattr(decoder_mod, "accept_greedy", broken)
    same, _ = run_oracle(tiny64, n=6)
    assert same < 6


@pytest.mark.parametrize(
    "spec,lazy",
    [(TreeSpec(1, 4, 6), None), (TreeSpec(3, 3, 12), 1), (TreeSpec(10, 5, 60), None),
     (TreeSpec(10, 5, 60), 32)],
)  # fmt: skip
def test_head_drafter_lossless(tiny64, spec, lazy):
    torch.manual_seed(0)
    head = DraftHead.for_target(tiny64.model)
    drafter = HeadDrafter(head, spec)
    dec = SpeculativeDecoder(tiny64.model, drafter, tiny64.eos_ids, lazy_logits_from=lazy)
    for p in prompts(5, tiny64.model.config.vocab_size, seed=1):
        ref = vanilla_generate(tiny64.model, p, 32, tiny64.eos_ids)
        out = dec.generate(p, 32)
        assert out.tokens == ref.tokens
        assert out.target_forwards == 1 + len(out.cycles)
        assert all(c.tree_size <= spec.total_tokens for c in out.cycles)


def test_eos_and_limit(tiny64):
    model = tiny64.model
    p = prompts(1, model.config.vocab_size, seed=3)[0]
    ref = vanilla_generate(model, p, 40, tiny64.eos_ids)
    eos = {ref.tokens[5]}  # pretend the 6th token is EOS: both must stop right after it
    oracle = NoisyOracle(model, depth=4, noise=0.0)
    out = SpeculativeDecoder(model, oracle, eos).generate(p, 40)
    assert out.tokens == vanilla_generate(model, p, 40, eos).tokens
    assert out.tokens[-1] in eos and len(out.tokens) <= 6
    oracle = NoisyOracle(model, depth=4, noise=0.0)
    assert len(SpeculativeDecoder(model, oracle, set()).generate(p, 7).tokens) == 7


def test_lazy_logits_visit_only_the_walked_nodes(tiny64):
    """Acceptance asks the LM head for the nodes it walks through, and the lazy rows give the
    same verdict as logits computed for the whole tree."""
    model = tiny64.model
    p = prompts(1, model.config.vocab_size, seed=4)[0]
    oracle = TopKOracle(model)  # the target's own top-2 at two levels: the walk goes 2 deep
    oracle.set_prompt(p)  # start is called by hand below, not by the decoder
    cache = model.new_cache(len(p) + 16)
    feats = model(torch.tensor([p]), cache=cache)[0]
    root = int(model.logits(feats[-1]).argmax())
    oracle.start(feats, torch.tensor(p[1:] + [root]), len(p) + 8)
    tree = oracle.propose()
    tokens, pos, mask = verification_inputs(tree, cache.length, feats.device)
    h = model(tokens, pos, cache, mask)[0]
    lazy = NodeLogits(h, model.logits)
    path, bonus = accept_greedy(tree, lazy)
    assert (path, bonus) == accept_greedy(tree, model.logits(h))
    assert path == [0, 1, 3]  # top-1 then top-1: accepted to the bottom of the tree
    assert sorted(lazy.rows) == path  # one LM-head row per visited node, none of the other 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widened_argmax_is_the_half_precision_argmax(dtype):
    """Acceptance widens half-precision rows before argmax for speed; the choice, ties
    included (few distinct values: most rows have several maxima), must stay the first
    maximal index, as the vanilla reference's argmax picks it."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-4, 4, (64, 49152), generator=g).to(dtype) / 8
    first = torch.stack([(r == r.max()).nonzero()[0, 0] for r in rows.float()])
    assert torch.equal(argmax_rows(rows), rows.argmax(-1))
    assert torch.equal(argmax_rows(rows), first)
    assert argmax_rows(rows[0]).ndim == 0  # one row in, one index out (the decoder's _pick)
