"""Combination strategies: tree merging, budget splitting, averaging, and losslessness of every
strategy (greedy: token for token; sampling: see test_combine_sampling.py)."""

from __future__ import annotations

import pytest
import torch

from taps.combine import build_proposer
from taps.combine.average import average_heads, resolve_weights
from taps.combine.confidence import ConfidenceRouter
from taps.combine.entropy import EntropyRouter
from taps.combine.group import split_budget
from taps.combine.merged import MergedTrees, merge_trees
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.engine.tree import DraftTree
from taps.models.draft_head import DraftHead
from tests.helpers import NoisyOracle
from tests.test_engine_greedy import prompts


def tree(tokens: list[int], parents: list[int], drafter: int = 0) -> DraftTree:
    n = len(tokens)
    lp = torch.tensor([0.0] + [-0.5] * (n - 1), dtype=torch.float64)
    scores = lp.clone()
    for i in range(1, n):
        scores[i] += scores[parents[i]]
    return DraftTree(torch.tensor(tokens), parents, lp, scores, torch.rand(n), drafter, 3)


def paths(t: DraftTree) -> set[tuple[int, ...]]:
    toks = t.tokens.tolist()
    return {tuple(toks[j] for j in t.path_to(i)) for i in range(len(t))}


# Root 7; A: 7-1-2, 7-1-3, 7-4 ; B: 7-1-2-5, 7-6
A = tree([7, 1, 4, 2, 3], [-1, 0, 0, 1, 1])
B = tree([7, 1, 6, 2, 5], [-1, 0, 0, 1, 3])


def test_merge_dedup_is_the_trie_of_all_paths():
    m = merge_trees([A, B], dedup=True)
    assert paths(m) == paths(A) | paths(B)
    assert len(m) == len(paths(A) | paths(B))  # each distinct path prefix verified once
    assert m.draft_forwards == 6 and m.drafter == -1
    mask = m.ancestor_mask()
    for i in range(len(m)):  # each node sees exactly the root and its own ancestors
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(m.path_to(i))


def test_merge_without_dedup_appends_trees():
    m = merge_trees([A, B], dedup=False)
    assert len(m) == len(A) + len(B) - 1
    assert paths(m) == paths(A) | paths(B)
    assert m.tokens[len(A) :].tolist() == B.tokens[1:].tolist()


def test_merge_rejects_different_roots():
    with pytest.raises(ValueError, match="root"):
        merge_trees([A, tree([8, 1], [-1, 0])])


def test_split_budget_matches_one_tree():
    specs = split_budget(TreeSpec(10, 5, 60), 2)
    assert [s.total_tokens for s in specs] == [31, 30]  # 30 + 29 draft tokens + shared root
    assert sum(s.total_tokens - 1 for s in split_budget(TreeSpec(10, 5, 60), 3)) == 59
    with pytest.raises(ValueError, match="matched"):
        split_budget(TreeSpec(2, 1, 3), 3)


def test_resolve_weights():
    assert resolve_weights(2, None, 0.3) == pytest.approx([0.3, 0.7])
    assert resolve_weights(3, [1, 1, 2], None) == pytest.approx([0.25, 0.25, 0.5])
    assert resolve_weights(3, None, None) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="routing.alpha"):
        resolve_weights(3, None, 0.5)
    with pytest.raises(ValueError, match="routing.weights"):
        resolve_weights(2, [1, -1], None)


def heads(tiny, n: int, d2t: bool = False) -> list[DraftHead]:
    out = []
    v = tiny.model.config.vocab_size
    for i in range(n):
        torch.manual_seed(100 + i)
        ids = torch.randperm(v)[: v // 2] if d2t else None
        out.append(DraftHead.for_target(tiny.model, d2t=ids).eval())
    return out


def test_average_weights_are_elementwise(tiny64):
    a, b = heads(tiny64, 2)
    avg = average_heads([a, b], [0.25, 0.75])
    for k, v in avg.state_dict().items():
        assert torch.allclose(v, 0.25 * a.state_dict()[k] + 0.75 * b.state_dict()[k]), k
    one = average_heads([a, b], [1.0, 0.0])
    g = torch.randn(3, tiny64.model.config.hidden_size, dtype=torch.float64)
    assert torch.equal(one.logits(g), a.logits(g))


def test_average_unites_draft_vocabularies(tiny64):
    a, b = heads(tiny64, 2, d2t=True)
    avg = average_heads([a, b], [0.5, 0.5])
    assert set(avg.d2t.tolist()) == set(a.d2t.tolist()) | set(b.d2t.tolist())
    assert torch.equal(avg.lm_head_weight, avg.lm_head_full[avg.d2t])


def test_build_proposer_rejects_unknown_options(tiny64):
    with pytest.raises(TypeError, match="budgte"):
        build_proposer("merged_tree", heads(tiny64, 2), TreeSpec(3, 2, 10), budgte="matched")
    with pytest.raises(ValueError, match="routing.budget"):
        build_proposer("merged_tree", heads(tiny64, 2), TreeSpec(3, 2, 10), budget="half")
    with pytest.raises(ValueError, match="two or more"):
        build_proposer("confidence", heads(tiny64, 1), TreeSpec(3, 2, 10))
    with pytest.raises(ValueError, match="routing='vote'"):
        build_proposer("vote", heads(tiny64, 2), TreeSpec(3, 2, 10))


def oracles(tiny, seed: int, noises=(0.1, 0.6, 0.35)) -> list[NoisyOracle]:
    out = []
    for j, noise in enumerate(noises):
        o = NoisyOracle(tiny.model, depth=4, noise=noise, seed=seed * 10 + j, jitter=True)
        out.append(o)
    return out


GROUPS = {
    "confidence": ConfidenceRouter,
    "entropy": EntropyRouter,
    "merged_dedup": lambda ds: MergedTrees(ds, dedup=True),
    "merged_plain": lambda ds: MergedTrees(ds, dedup=False),
}


@pytest.mark.parametrize("name", GROUPS)
def test_strategy_greedy_lossless_with_oracles(tiny64, name):
    """Three drafters of different quality, with random scores so routing switches between
    them: the output must still be the target's own greedy output, token for token."""
    model = tiny64.model
    same, taus, chosen = 0, [], set()
    for i, p in enumerate(prompts(6, model.config.vocab_size, seed=5)):
        group = oracles(tiny64, i)
        out = SpeculativeDecoder(model, GROUPS[name](group), tiny64.eos_ids).generate(p, 32)
        same += out.tokens == vanilla_generate(model, p, 32, tiny64.eos_ids).tokens
        taus.append(out.tau)
        chosen |= {c.drafter for c in out.cycles}
    assert same == 6, f"{name}: only {same}/6 prompts identical"
    assert sum(taus) / len(taus) > 1.8  # drafts are accepted: the test exercises acceptance
    if name == "confidence":
        assert chosen == {0, 1, 2}  # every drafter's tree was verified at some point
    if name == "entropy":
        assert len(chosen) >= 2  # turns went to different drafters


STRATEGIES = [
    ("average", {"alpha": None}),
    ("confidence", {}),
    ("entropy", {}),
    ("merged_tree", {"budget": "full"}),
    ("merged_tree", {"budget": "matched"}),
    ("merged_tree", {"budget": "full", "dedup": False}),
]


@pytest.mark.parametrize("routing,options", STRATEGIES)
def test_strategy_greedy_lossless_with_heads(tiny64, routing, options):
    """Real draft heads (random, three of them, one with a draft vocabulary) through the
    factory: KV caches of every head stay aligned with the target over many cycles."""
    hs = heads(tiny64, 3)
    hs[2] = heads(tiny64, 1, d2t=True)[0]
    if routing == "average":
        hs = heads(tiny64, 3)  # averaging needs a draft vocabulary on all or none
    spec = TreeSpec(4, 3, 16)
    proposer = build_proposer(routing, hs, spec, **options)
    dec = SpeculativeDecoder(tiny64.model, proposer, tiny64.eos_ids)
    for p in prompts(4, tiny64.model.config.vocab_size, seed=2):
        out = dec.generate(p, 32)
        assert out.tokens == vanilla_generate(tiny64.model, p, 32, tiny64.eos_ids).tokens
        sizes = [c.tree_size for c in out.cycles]
        if options.get("budget") == "matched":
            assert max(sizes) <= spec.total_tokens
        if routing in ("confidence", "merged_tree"):
            assert all(c.draft_forwards == 3 * (1 + spec.depth) for c in out.cycles)
            # Drafters that all catch up stay in step with each other.
            assert len({d.cache.length for d in proposer.drafters}) == 1


def test_identical_drafters_change_nothing(tiny64):
    """Routing between copies of one head, or merging their trees with dedup, verifies
    exactly the single head's trees: same acceptances, cycle by cycle."""
    (h,) = heads(tiny64, 1)
    spec = TreeSpec(4, 3, 16)
    p = prompts(1, tiny64.model.config.vocab_size, seed=9)[0]
    ref = SpeculativeDecoder(tiny64.model, HeadDrafter(h, spec), tiny64.eos_ids).generate(p, 40)
    for routing in ("confidence", "entropy", "merged_tree"):
        proposer = build_proposer(routing, [h, h], spec)
        out = SpeculativeDecoder(tiny64.model, proposer, tiny64.eos_ids).generate(p, 40)
        assert [c.accepted for c in out.cycles] == [c.accepted for c in ref.cycles], routing
        assert [c.tree_size for c in out.cycles] == [c.tree_size for c in ref.cycles], routing


def test_entropy_router_picks_lowest_entropy_and_keeps_it(tiny64):
    model = tiny64.model
    p = prompts(1, model.config.vocab_size, seed=4)[0]
    group = oracles(tiny64, 0, noises=(0.2, 0.2))
    router = EntropyRouter(group)
    out = SpeculativeDecoder(model, router, tiny64.eos_ids).generate(p, 30)
    first = out.cycles[0]
    assert first.route_scores is not None and len(first.route_scores) == 2
    best = max(range(2), key=first.route_scores.__getitem__)
    assert {c.drafter for c in out.cycles} == {best}
    assert all(c.route_scores is None for c in out.cycles[1:])
