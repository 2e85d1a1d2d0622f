"""Drawn (sampled) draft trees, `TreeSpec(sampled=True)`: children drawn without replacement
from the draft distribution q and verified by recursive rejection against it. The output must
follow the target's distribution exactly (a bigram model with exact probabilities, then the
tiny float64 target end to end); a broken residual rule must fail the same tests; greedy
decoding with the same spec (the usual dynamic tree) must equal vanilla greedy; the tree's shape must not depend on the
draws; and strategies that pick trees by their draws must refuse the spec."""

from __future__ import annotations

import pytest
import torch

import taps.engine.verify as verify_mod
from taps.combine import build_proposer
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.engine.oracle import OracleDrafter
from taps.engine.tree import DraftTree
from taps.engine.verify import accept_sampling, target_probs
from taps.models.draft_head import DraftHead
from tests.test_engine_greedy import prompts
from tests.test_engine_sampling import TABLE, V, chi_square_pvalue, exact
from tests.test_engine_sampling_e2e import joint_test

SAMPLES = 20_000
# The draft's own bigram logits: correlated with the target's but flatter and reordered.
QTABLE = 0.6 * TABLE + torch.randn(V, V, generator=torch.Generator().manual_seed(5),
                                   dtype=torch.float64)  # fmt: skip


def drawn_tree(gen: torch.Generator, temperature: float) -> DraftTree:
    """Root token 0 with 3 children drawn from q, the first drawn one with 2 drawn children."""
    tokens, parents, dists = [0], [-1], {}
    parent = 0
    for k in (3, 2):
        q = torch.softmax(QTABLE[tokens[parent]] / temperature, -1)
        ids = torch.multinomial(q, k, replacement=False, generator=gen)
        dists[parent] = (torch.arange(V), q)
        first = len(tokens)
        tokens += ids.tolist()
        parents += [parent] * k
        parent = first
    n = len(tokens)
    z = torch.zeros(n, dtype=torch.float64)
    return DraftTree(torch.tensor(tokens), parents, z, z.clone(), z.clone(), draft_dists=dists)


def run_bigram(temperature: float, top_p: float) -> float:
    gen = torch.Generator().manual_seed(99)
    counts = torch.zeros(V, V, V)
    for _ in range(SAMPLES):
        t = drawn_tree(gen, temperature)
        path, bonus = accept_sampling(t, TABLE[t.tokens], temperature, top_p, gen)
        out = t.tokens[path[1:]].tolist() + [bonus]
        while len(out) < 3:
            p = target_probs(TABLE[out[-1]], temperature, top_p)
            out.append(int(torch.multinomial(p.float(), 1, generator=gen)))
        a, b, c = out[:3]
        counts[a, b, c] += 1
    return chi_square_pvalue(counts, exact(temperature, top_p))


def _no_residual(kids, tokens, probs, dist, generator):
    """Broken: after a rejection the next child is tested against p itself, not p - q."""
    ids, qd = dist
    q = torch.zeros_like(probs)
    q[ids] = qd.to(q.dtype)
    for c in kids:
        x = tokens[c]
        if torch.rand((), generator=generator, dtype=torch.float64) * q[x] < probs[x]:
            return c, probs
    return None, probs


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_drawn_trees_sample_the_target_distribution(temperature, top_p):
    assert run_bigram(temperature, top_p) > 1e-3


def _q_not_renormalised(q, x):
    """Broken: a rejected draft leaves q, but q is not renormalised over what is left."""
    q[x] = 0.0
    return q


def one_node_pvalue(gen_seed: int = 5) -> float:
    """Three children drawn at one node, the first token only: the 8-cell test has the power
    that the 3-token joint lacks against errors in how q shrinks after a rejection."""
    gen = torch.Generator().manual_seed(gen_seed)
    q = torch.softmax(QTABLE[6], -1)
    counts = torch.zeros(V)
    for _ in range(SAMPLES):
        ids = torch.multinomial(q, 3, replacement=False, generator=gen)
        n = 4
        t = DraftTree(torch.tensor([6, *ids.tolist()]), [-1, 0, 0, 0], torch.zeros(n),
                      torch.zeros(n), torch.zeros(n), draft_dists={0: (torch.arange(V), q)})  # fmt: skip
        path, bonus = accept_sampling(t, TABLE[t.tokens], 1.0, 1.0, gen)
        counts[t.tokens[path[1]] if len(path) > 1 else bonus] += 1
    return chi_square_pvalue(counts, target_probs(TABLE[6], 1.0))


def test_one_node_recursive_rejection_is_exact(monkeypatch):
    assert one_node_pvalue() > 1e-3
    monkeypatch.setattr(verify_mod, "_without", _q_not_renormalised)
    assert one_node_pvalue() < 1e-6


def test_oracle_spine_is_accepted_whole(tiny64):
    """The target drafting for itself through a drawn spine has q = p at every node, so every
    draft is accepted: wrong positions or masks in the spine's cache would make q differ."""
    spec = TreeSpec(top_k=3, depth=3, total_tokens=13, sampled=True)
    assert spec.draft_levels(1.0) == 4 and spec.draft_levels(0.0) == 4
    assert TreeSpec(6, 3, 16, sampled=True).draft_levels(1.0) == 3
    dec = SpeculativeDecoder(tiny64.model, OracleDrafter(tiny64.model, spec), set())
    out = dec.generate(prompts(1, tiny64.model.config.vocab_size)[0], 40, 1.0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [c.accepted for c in out.cycles] == [4] * len(out.cycles)


def test_draws_refuse_bad_heads(tiny64):
    model = tiny64.model
    prompt = prompts(1, model.config.vocab_size)[0]
    states = model.states(torch.tensor([prompt]))[0]
    repeated = torch.tensor([5, 6, 7, 5])  # two draft rows of token 5
    some = torch.tensor([5, 6, 7, 8])  # a d2t copies the LM head's rows: the target's stay
    for head, match in ((DraftHead.for_target(model, d2t=repeated), "repeated target tokens"),
                        (DraftHead.for_target(model, d2t=some), "non-finite")):  # fmt: skip
        if match == "non-finite":
            head.lm_head_weight[0] = float("nan")
        drafter = HeadDrafter(head, TreeSpec(2, 2, 6, sampled=True))
        drafter.set_sampling(1.0, None)
        drafter.start(states, torch.tensor(prompt[1:] + [5]), 64)
        with pytest.raises(ValueError, match=match):
            drafter.propose()


def test_broken_residual_rule_is_detected(monkeypatch):
    monkeypatch.setattr(verify_mod, "_try_drawn", _no_residual)
    assert run_bigram(1.0, 1.0) < 1e-6


def _tempered_oracle(model, spec: TreeSpec) -> OracleDrafter:
    """The target drafting for itself through flattened, perturbed logits: q close to p but
    not equal, so both acceptances and residual draws happen."""
    d = OracleDrafter(model, spec)
    noise = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)  # fmt: skip
    logits = d.head.logits
    d.head.logits = lambda g: 0.7 * logits(g) + noise.to(g.dtype)  # type: ignore[method-assign]
    return d


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_tiny_target_drawn_trees_are_lossless(tiny64, temperature, top_p):
    spec = TreeSpec(top_k=3, depth=2, total_tokens=8, sampled=True)
    proposer = _tempered_oracle(tiny64.model, spec)
    p, tv = joint_test(tiny64, temperature, top_p, proposer=proposer, samples=3000)
    assert p > 1e-3, f"chi-square p={p:.2e} TV={tv:.3f}"


def test_tiny_target_broken_residual_fails(tiny64, monkeypatch):
    monkeypatch.setattr(verify_mod, "_try_drawn", _no_residual)
    spec = TreeSpec(top_k=3, depth=2, total_tokens=8, sampled=True)
    p, _ = joint_test(tiny64, 1.0, 1.0, proposer=_tempered_oracle(tiny64.model, spec),
                      samples=3000)  # fmt: skip
    assert p < 1e-6


def test_greedy_with_a_drawn_spec_equals_vanilla(tiny64):
    """At T = 0 the spec drafts the usual dynamic tree; greedy acceptance keeps it exact."""
    model = tiny64.model
    spec = TreeSpec(top_k=3, depth=3, total_tokens=10, sampled=True)
    accepted = 0
    for p in prompts(6, model.config.vocab_size):
        dec = SpeculativeDecoder(model, _tempered_oracle(model, spec), tiny64.eos_ids)
        out = dec.generate(p, 40)
        assert out.tokens == vanilla_generate(model, p, 40, tiny64.eos_ids).tokens
        accepted += sum(c.accepted for c in out.cycles)
    assert accepted > 20  # the spine's drafts were accepted, so the test exercised them


def test_shape_is_static_and_dists_follow_the_draws(tiny64):
    torch.manual_seed(0)
    head = DraftHead.for_target(tiny64.model)
    spec = TreeSpec(top_k=3, depth=3, total_tokens=9, sampled=True)
    drafter = HeadDrafter(head, spec)
    gen = torch.Generator().manual_seed(1)
    drafter.set_sampling(1.0, gen)
    model = tiny64.model
    states = model.states(torch.tensor([prompts(1, model.config.vocab_size)[0]]))[0]
    nxt = torch.tensor(prompts(1, model.config.vocab_size)[0][1:] + [5])
    drafter.start(states, nxt, 64)
    trees = [drafter.propose() for _ in range(20)]
    # 3 children a level, the first drawn expanded, cut at 8 draft nodes in level order.
    assert all(t.parents == [-1, 0, 0, 0, 1, 1, 1, 4, 4] for t in trees)
    assert all(sorted(t.draft_dists) == [0, 1, 4] for t in trees)
    assert len({tuple(t.tokens.tolist()) for t in trees}) > 1  # the draws vary
    for t in trees:
        for node, (ids, q) in t.draft_dists.items():
            kids = t.tokens[t.children[node]]
            assert len(set(kids.tolist())) == len(kids)  # without replacement
            assert all(float(q[(ids == x).nonzero()[0, 0]]) > 0 for x in kids)
    drafter.set_sampling(0.0, None)
    greedy = drafter.propose()  # greedy: the dynamic top-k tree, nothing to reject against
    assert greedy.draft_dists is None and greedy.parents != trees[0].parents


@pytest.mark.parametrize("name", ["confidence", "entropy", "merged_tree"])
def test_strategies_that_choose_by_the_draws_refuse_drawn_trees(tiny64, name):
    heads = [DraftHead.for_target(tiny64.model) for _ in range(2)]
    with pytest.raises(ValueError, match="tree.sampled=true with routing="):
        build_proposer(name, heads, TreeSpec(top_k=2, depth=2, total_tokens=6, sampled=True))
    assert build_proposer("hedge", heads, TreeSpec(2, 2, 6, sampled=True)) is not None
