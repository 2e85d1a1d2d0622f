"""Every combination strategy keeps speculative sampling lossless: the first three tokens
follow the tiny float64 target's exact joint distribution (the chi-square test of
test_engine_sampling_e2e.py), while routing switches between drafters of different quality
and merged trees hold several candidates per position."""

from __future__ import annotations

import pytest
import torch

from taps.combine import build_proposer
from taps.combine.confidence import ConfidenceRouter
from taps.combine.entropy import EntropyRouter
from taps.combine.merged import MergedTrees
from taps.engine.drafting import TreeSpec
from taps.models.draft_head import DraftHead
from tests.helpers import TopKOracle
from tests.test_engine_sampling_e2e import joint_test

# Half the single-drafter test's samples: the strategies add no new acceptance rule, and the
# chi-square test keeps its power against a wrong distribution at this size (CI time matters).
SAMPLES = 3000
STRATEGIES = {
    "confidence": ConfidenceRouter,
    "entropy": EntropyRouter,
    "merged_dedup": lambda ds: MergedTrees(ds, dedup=True),
    "merged_plain": lambda ds: MergedTrees(ds, dedup=False),
}


def drafters(tiny64) -> list[TopKOracle]:
    """The target's top-2 (good) and its ranks 2-3 (worse, overlapping): merged trees share
    the rank-2 token, and jittered scores make routers alternate."""
    jitter = torch.Generator().manual_seed(3)
    return [TopKOracle(tiny64.model, 2, 0, jitter), TopKOracle(tiny64.model, 2, 1, jitter)]


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_sampling_is_lossless(tiny64, name):
    p, tv = joint_test(tiny64, 1.0, 1.0, STRATEGIES[name](drafters(tiny64)), samples=SAMPLES)
    assert p > 1e-3, f"{name}: chi-square p={p:.2e} TV={tv:.3f}"


def test_averaged_heads_sampling_is_lossless(tiny64):
    """routing=average through the factory with real (random) heads: wide trees get their
    drafts accepted now and then, so the acceptance path is exercised, if rarely."""
    hs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        hs.append(DraftHead.for_target(tiny64.model).eval())
    proposer = build_proposer("average", hs, TreeSpec(16, 1, 20), alpha=0.3)
    p, tv = joint_test(tiny64, 1.0, 1.0, proposer, min_accept=0.001, samples=SAMPLES)
    assert p > 1e-3, f"chi-square p={p:.2e} TV={tv:.3f}"
