"""Online routing (hedge, bandit) and the mixed-task stream: counterfactual scores, what the
routers learn and forget, losslessness (greedy and sampling), and bench=stream."""

from __future__ import annotations

import itertools

import pytest
import torch

from taps.combine import build_proposer
from taps.combine.online import counterfactual_scores
from taps.data.benchmarks import BenchPrompt, load_stream
from taps.data.conversations import DataError
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead
from tests.test_engine_greedy import prompts

SPEC = TreeSpec(3, 3, 12)


def trained_prompts(tiny, n: int = 5) -> list[list[int]]:
    """The prompts the trained EAGLE-3 head of conftest.trained3 drafts well on."""
    return [p[:12] + [0] * (12 - len(p[:12])) for p in prompts(n, tiny.model.config.vocab_size, 1)]


def pair(tiny, trained3) -> list:
    """A good drafter (trained) and a poor one (a random EAGLE-2 head)."""
    torch.manual_seed(5)
    return [trained3, DraftHead.for_target(tiny.model).eval()]


class FakeHead:
    """Logits that put all mass on a fixed token per row (`picks`), or given probabilities."""

    d2t = None

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        return self.rows[g.long().flatten()]

    def to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


def fake_drafter(rows: torch.Tensor) -> HeadDrafter:
    d = HeadDrafter.__new__(HeadDrafter)
    d.head = FakeHead(rows)
    d.predictions = torch.arange(len(rows), dtype=torch.float64)[:, None]
    return d


def test_counterfactual_scores_greedy_prefix_and_expected_length():
    big = 50.0
    # Predictions for 4 verified tokens [3, 1, 2, 0]: right, right, wrong, right.
    picks = torch.full((4, 5), -big)
    for i, t in enumerate([3, 1, 4, 0]):
        picks[i, t] = big
    d = fake_drafter(picks)
    verified = torch.tensor([3, 1, 2, 0])
    assert counterfactual_scores(d, [verified], greedy=True) == [2.0]  # the prefix stops at row 2
    q = torch.tensor([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0]]).log()
    d = fake_drafter(q)
    got = counterfactual_scores(d, [torch.tensor([1, 1, 0])], greedy=False)
    assert got == pytest.approx([0.5 + 0.5 * 0.8 + 0.5 * 0.8 * 1.0])
    # Several cycles caught up at once: each cycle's prefix is scored on its own rows.
    d = fake_drafter(picks)
    assert counterfactual_scores(d, [verified[:1], verified[1:3], verified[3:]], True) == [1, 1, 1]
    d = fake_drafter(q)
    got = counterfactual_scores(d, [torch.tensor([1]), torch.tensor([1, 0])], greedy=False)
    assert got == pytest.approx([0.5, 0.8 + 0.8 * 1.0])


@pytest.mark.parametrize(
    "routing,options",
    [
        ("hedge", {}),
        ("hedge", {"choose": "argmax", "discount": 0.9, "reset": "prompt"}),
        ("hedge", {"discount": 0.9, "feedback_every": 3}),
        ("bandit", {}),
        ("bandit", {"algorithm": "exp3", "exploration": 0.3}),
    ],
)
def test_online_routers_are_greedy_lossless(tiny64, trained3, routing, options):
    heads = pair(tiny64, trained3)
    proposer = build_proposer(routing, heads, SPEC, **options)
    dec = SpeculativeDecoder(tiny64.model, proposer, tiny64.eos_ids)
    chosen, ran = set(), []
    hooks = [h.register_forward_hook(lambda *_: ran.append(1)) for h in heads]
    proposer.new_session()
    try:
        billed = _decode_each(dec, proposer, tiny64, routing, options, chosen)
    finally:
        for h in hooks:
            h.remove()
    # Every head forward that ran is billed to a tree, or waits for the next prompt's first.
    assert billed + proposer.forwards == len(ran)
    assert chosen == {0, 1} or routing == "hedge"  # bandits try every drafter


def _decode_each(dec, proposer, tiny64, routing, options, chosen) -> int:
    """Decode the trained prompts one after another, checking each; the forwards billed."""
    billed = 0
    for p in trained_prompts(tiny64):
        out = dec.generate(p, 32)
        assert out.tokens == vanilla_generate(tiny64.model, p, 32, tiny64.eos_ids).tokens
        chosen |= {c.drafter for c in out.cycles}
        forwards = [c.draft_forwards for c in out.cycles]
        billed += sum(forwards)
        if options.get("feedback_every", 1 if routing == "hedge" else None) == 1:
            # One tree drafted, plus one catch-up forward of the other drafter every cycle.
            assert forwards == [SPEC.depth + 2] * len(out.cycles)
        else:  # the other drafter catches up every 3 cycles (hedge) or when chosen (bandit)
            # (a prompt's first tree also bills the last prompt's leftover catch-ups)
            assert forwards[0] >= SPEC.depth + 2 and min(forwards) == SPEC.depth + 1
            assert sum(forwards) < (SPEC.depth + 2) * len(forwards)
        if routing == "hedge":
            proposer.feedback()
            assert len({d.cache.length for d in proposer.drafters}) == 1  # all in step
    return billed


def test_deferred_catch_up_learns_what_every_cycle_catch_up_does(tiny64, trained3):
    """With the same drafters chosen, hedge scoring every 4 cycles (one catch-up forward over
    them) ends with the weights of hedge scoring every cycle."""
    routers = []
    for every in (1, 4):
        router = build_proposer(
            "hedge", pair(tiny64, trained3), SPEC, discount=0.9, feedback_every=every
        )
        schedule = itertools.cycle([0, 0, 1, 0, 1, 1, 1])
        router.choose = lambda s=schedule: (next(s), [0.5, 0.5])
        router.new_session()
        dec = SpeculativeDecoder(tiny64.model, router, tiny64.eos_ids)
        outs = [dec.generate(p, 40).tokens for p in trained_prompts(tiny64, 3)]
        router.feedback()
        routers.append((router, outs))
    (eager, a), (deferred, b) = routers
    assert a == b
    assert eager.scores.sum() > 0
    torch.testing.assert_close(deferred.scores, eager.scores, rtol=1e-9, atol=1e-9)


def test_hedge_learns_the_better_drafter_and_forgets_per_session(tiny64, trained3):
    router = build_proposer("hedge", pair(tiny64, trained3), SPEC, choose="argmax")
    dec = SpeculativeDecoder(tiny64.model, router, tiny64.eos_ids)
    router.new_session()
    for p in trained_prompts(tiny64, 3):
        out = dec.generate(p, 32)
    assert router.scores[0] > router.scores[1]  # the trained head would have got more
    assert out.cycles[-1].drafter == 0 and out.cycles[-1].route_scores[0] > 0.9
    router.new_session()
    assert router.scores.tolist() == [0.0, 0.0]
    kept = build_proposer("hedge", pair(tiny64, trained3), SPEC, reset="prompt")
    kept.new_session()
    SpeculativeDecoder(tiny64.model, kept, set()).generate(trained_prompts(tiny64)[0], 16)
    assert kept.scores.sum() > 0
    # reset=prompt: the next prompt starts from nothing (2 tokens: one cycle, nothing learnt)
    SpeculativeDecoder(tiny64.model, kept, set()).generate(trained_prompts(tiny64)[1], 2)
    assert kept.scores.tolist() == [0.0, 0.0]


def test_bandit_ucb_tries_each_then_exploits(tiny64, trained3):
    router = build_proposer("bandit", pair(tiny64, trained3), SPEC, exploration=0.1)
    router.new_session()
    out = SpeculativeDecoder(tiny64.model, router, set()).generate(trained_prompts(tiny64)[0], 48)
    assert [c.drafter for c in out.cycles[:2]] == [0, 1]  # untried first, in order
    assert router.pulls[0] > router.pulls[1]  # then mostly the better one
    # A drafter catches up only when chosen: it still misses every cycle since it drafted
    # (the last cycle is never committed: decoding ends there).
    last = len(out.cycles) - 1
    for i in (0, 1):
        drafted = max(c for c, s in enumerate(out.cycles) if s.drafter == i)
        assert len(router.pending[i]) == last - drafted


def test_router_options_are_checked(tiny64, trained3):
    with pytest.raises(ValueError, match="eta > 0"):
        build_proposer("hedge", pair(tiny64, trained3), SPEC, eta=0)
    with pytest.raises(ValueError, match="routing.reset"):
        build_proposer("hedge", pair(tiny64, trained3), SPEC, reset="turn")
    with pytest.raises(ValueError, match="routing.algorithm"):
        build_proposer("bandit", pair(tiny64, trained3), SPEC, algorithm="thompson")


@pytest.mark.parametrize(
    "routing,options",
    [("hedge", {"choose": "sample"}), ("hedge", {"choose": "argmax"}), ("bandit", {})],
)
def test_online_routers_sampling_is_lossless(tiny64, trained3, routing, options):
    from tests.test_engine_sampling_e2e import joint_test

    proposer = build_proposer(routing, pair(tiny64, trained3), TreeSpec(3, 2, 8), **options)
    proposer.new_session()
    p, tv = joint_test(tiny64, 1.0, 1.0, proposer, min_accept=0.05, samples=3000)
    assert p > 1e-3, f"{routing}: chi-square p={p:.2e} TV={tv:.3f}"


def test_hedge_with_drawn_trees_samples_losslessly(tiny64, trained3):
    """Online routers choose before the draws, so drawn trees (tree.sampled) stay exact
    under them; the router hands the decoder's generator on to both drafters."""
    from tests.test_engine_sampling_e2e import joint_test

    spec = TreeSpec(3, 2, 8, sampled=True)
    proposer = build_proposer("hedge", pair(tiny64, trained3), spec, choose="sample")
    proposer.new_session()
    p, tv = joint_test(tiny64, 1.0, 1.0, proposer, min_accept=0.05, samples=3000)
    assert p > 1e-3, f"chi-square p={p:.2e} TV={tv:.3f}"
    assert all(d.generator is not None for d in proposer.drafters)


def test_stream_interleaves_sources_by_seed(data_dir):
    a = load_stream(data_dir, 3, {"gsm8k": 1, "mt_bench": 1, "svamp": 2}, seed=0)
    b = load_stream(data_dir, 3, {"gsm8k": 1, "mt_bench": 1, "svamp": 2}, seed=0)
    c = load_stream(data_dir, 3, {"gsm8k": 1, "mt_bench": 1, "svamp": 2}, seed=1)
    assert a == b and [p.source for p in a] != [p.source for p in c]
    assert sorted(p.source for p in a) == ["gsm8k"] * 3 + ["mt_bench"] * 3 + ["svamp"] * 3
    assert all(isinstance(p, BenchPrompt) and p.question_id.startswith(p.source + "/") for p in a)
    assert len({p.source for p in a[:4]}) > 1  # interleaved, not one block per source
    only = load_stream(data_dir, 2, {"gsm8k": 1, "svamp": 0}, seed=0)
    assert [p.source for p in only] == ["gsm8k", "gsm8k"]
    later = load_stream(data_dir, 2, {"gsm8k": 1, "svamp": 0}, seed=0, skip=1)
    assert [p.question_id for p in later] == [p.question_id for p in a if p.source == "gsm8k"][1:3]
    with pytest.raises(DataError, match=r"bench\.stream\.skip"):
        load_stream(data_dir, 2, {"gsm8k": 1}, seed=0, skip=-1)
    with pytest.raises(DataError, match=r"bench\.stream\.mix"):
        load_stream(data_dir, 2, {"gsm8k": -1}, seed=0)
    with pytest.raises(DataError, match=r"bench\.stream\.mix"):
        load_stream(data_dir, 2, {"humaneval": 1}, seed=0)
