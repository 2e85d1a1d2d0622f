"""The oracle proposer (taps/engine/oracle.py): the target drafting for itself through the
engine, whose tau is the ceiling `experiments/speed.py` reports. At T=0 it must accept every
drafted level, which holds only if it reads the whole prompt and places each tree node at the
position the verifier gives it."""

from __future__ import annotations

import pytest
import torch

from taps.combine.confidence import ConfidenceRouter
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.engine.oracle import OracleDrafter
from taps.models.draft_head import DraftHead
from tests.helpers import experiment_script
from tests.test_engine_greedy import prompts


def test_oracle_chain_accepts_every_level(tiny64):
    spec = TreeSpec(top_k=1, depth=4, total_tokens=6)
    dec = SpeculativeDecoder(tiny64.model, OracleDrafter(tiny64.model, spec), tiny64.eos_ids)
    for p in prompts(6, tiny64.model.config.vocab_size, seed=3):
        g = dec.generate(p, 40)
        assert g.tokens == vanilla_generate(tiny64.model, p, 40, tiny64.eos_ids).tokens
        assert [c.accepted for c in g.cycles] == [spec.depth + 1] * len(g.cycles)


def test_oracle_without_the_prompts_first_token_is_not_the_target(tiny64, monkeypatch):
    """The check above fails when the oracle skips prompt[0] (as a head's catch-up does)."""
    monkeypatch.setattr(OracleDrafter, "set_prompt", lambda self, p: setattr(self, "first", 0))
    spec = TreeSpec(top_k=1, depth=4, total_tokens=6)
    dec = SpeculativeDecoder(tiny64.model, OracleDrafter(tiny64.model, spec), tiny64.eos_ids)
    accepted = [
        c.accepted
        for p in prompts(6, tiny64.model.config.vocab_size, seed=3)
        for c in dec.generate(p, 40).cycles
    ]
    assert min(accepted) < spec.depth + 1


def test_oracle_inside_a_combination_strategy_reads_the_prompt(tiny64):
    """A DrafterGroup hands the prompt on to its drafters: an oracle routed beside a head
    still accepts every level whenever it drafts, and the output is vanilla's."""
    spec = TreeSpec(top_k=1, depth=4, total_tokens=6)
    model, eos = tiny64.model, tiny64.eos_ids
    group = ConfidenceRouter(
        [OracleDrafter(model, spec), HeadDrafter(DraftHead.for_target(model), spec)]
    )
    for p in prompts(4, model.config.vocab_size, seed=5):
        g = SpeculativeDecoder(model, group, eos).generate(p, 32)
        assert g.tokens == vanilla_generate(model, p, 32, eos).tokens
        oracle_cycles = [c.accepted for c in g.cycles if c.drafter == 0]
        assert oracle_cycles and min(oracle_cycles) == spec.depth + 1, g.cycles


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_oracle_tree_beats_an_untrained_head(tiny64, temperature):
    """On a branching tree the oracle decodes losslessly at T=0 and out-accepts a random head
    at both temperatures (the ceiling is above what a drafter reaches)."""
    spec = TreeSpec(top_k=3, depth=3, total_tokens=12)
    model, eos = tiny64.model, tiny64.eos_ids
    torch.manual_seed(0)
    oracle = SpeculativeDecoder(model, OracleDrafter(model, spec), eos)
    head = SpeculativeDecoder(model, HeadDrafter(DraftHead.for_target(model), spec), eos)
    taus = {"oracle": [], "head": []}
    for i, p in enumerate(prompts(6, model.config.vocab_size, seed=4)):
        for name, dec in (("oracle", oracle), ("head", head)):
            g = dec.generate(p, 32, temperature, generator=torch.Generator().manual_seed(i))
            taus[name].append(g.tau)
            if temperature == 0 and name == "oracle":
                assert g.tokens == vanilla_generate(model, p, 32, eos).tokens
    assert sum(taus["oracle"]) > sum(taus["head"]) + 0.5 * len(taus["head"]), taus


def test_speed_ceiling_scales_by_the_oracles_tau():
    mod = experiment_script("speed")
    rows = {
        "ours_vanilla": {"tokens_per_s": 10.0},
        "ours_spec_single": {"tau": 2.0, "vs_ours_vanilla": 1.5},
        "ours_spec_oracle": {"tau": 3.0, "vs_ours_vanilla": 0.4},
    }
    assert mod.ceiling(rows) == {
        "ours_spec_single": {"tau": 2.0, "oracle_tau": 3.0, "vs_ours_vanilla": 2.25}
    }
    assert mod.ceiling({k: v for k, v in rows.items() if "oracle" not in k}) == {}
