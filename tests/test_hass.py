"""HASS context alignment: exact key sets per query, step 1 == EAGLE-2, -inf masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taps.models.draft_head import DraftHead
from taps.training.hass import HassConfig, alignment_mask, hass_forward, hass_loss
from taps.training.losses import LossWeights, eagle_loss
from taps.training.module import DraftModule
from taps.training.objectives import Eagle2Objective, HassObjective
from taps.training.train import build_objective


def visible(mask: torch.Tensor, n: int) -> list[list[tuple[int, int]]]:
    """(set, position) pairs each query may attend to."""
    return [[(int(c) // n, int(c) % n) for c in row.nonzero()] for row in mask]


def test_alignment_masks_pin_every_key():
    n = 5
    assert visible(alignment_mask(n, 0), n)[3] == [(0, 0), (0, 1), (0, 2), (0, 3)]  # causal
    step2 = visible(alignment_mask(n, 1), n)
    assert step2[0] == [(1, 0)]  # nothing real before it: only itself
    assert step2[3] == [(0, 0), (0, 1), (0, 2), (1, 3)]  # real <= r-1, then itself
    step3 = visible(alignment_mask(n, 2), n)
    assert step3[0] == [(2, 0)]
    assert step3[1] == [(1, 0), (2, 1)]
    # query 4 at depth 3: real keys <= 2, its depth-2 draft at 3 (set 1), itself at 4 (set 2)
    assert step3[4] == [(0, 0), (0, 1), (0, 2), (1, 3), (2, 4)]


def head_and_batch(tiny64):
    torch.manual_seed(0)
    head = DraftHead.for_target(tiny64.model)
    b, n, h = 2, 9, tiny64.model.config.hidden_size
    f = torch.randn(b, n + 1, h, dtype=torch.float64)
    tokens = torch.randint(0, 1000, (b, n))
    mask = torch.ones(b, n, dtype=torch.uint8)
    mask[1, 6:] = 0  # right padding in the second row
    return head, f[:, :-1], tokens, f[:, 1:], mask


def test_step_one_is_eagle_training(tiny64):
    head, f_in, tokens, f_next, mask = head_and_batch(tiny64)
    w = LossWeights()
    hass, _ = hass_loss(head, f_in, tokens, f_next, mask, w, HassConfig(1, 10, 0.0))
    eagle, _ = eagle_loss(head(f_in, tokens), f_next, mask, head.lm_head_weight, w)
    assert torch.allclose(hass, eagle, atol=1e-12)


def test_later_steps_ignore_masked_keys_and_padding(tiny64):
    head, f_in, tokens, f_next, mask = head_and_batch(tiny64)
    w = LossWeights()
    cfg = HassConfig(3, 10, 1.0)
    base, m = hass_loss(head, f_in, tokens, f_next, mask, w, cfg)
    assert {"step1/loss", "step2/loss", "step3/loss", "step3/topk_loss"} <= set(m)
    # Changing padded inputs (row 1, positions >= 6 carry loss mask 0 and are at the end)
    # must not change the loss: no supervised query can see them.
    f2 = f_in.clone()
    f2[1, 7:] += 3.0
    t2 = tokens.clone()
    t2[1, 7:] = 5
    same, _ = hass_loss(head, f2, t2, f_next, mask, w, cfg)
    assert torch.allclose(base, same, atol=1e-10)


def test_step_k_equals_inference_drafting_at_depth_k(tiny64):
    """g^{k+1}[r] must equal what the head computes at inference when real features stop at
    r-k and it feeds its own outputs forward k times (teacher-forced tokens)."""
    head, f_in, tokens, _, _ = head_and_batch(tiny64)
    outs = hass_forward(head, f_in[:1], tokens[:1], steps=3)
    for k in range(3):
        for r in range(k, 9):
            cache = head.new_cache(16)
            real = r - k + 1  # real pairs at positions 0..r-k
            g = head(f_in[:1, :real], tokens[:1, :real], cache=cache)[0, -1]
            for p in range(real, r + 1):  # k draft steps along the chain
                g = head(g[None, None], tokens[:1, p : p + 1], cache=cache)[0, -1]
            assert torch.allclose(outs[k][0, r], g, atol=1e-10), (k, r)


def test_hass_drafter_config_trains(tmp_path, cache_dir):
    from tests.test_training import tiny_cfg, train_tiny

    keys = {}
    for drafter in ("eagle2", "hass"):
        cfg = tiny_cfg(tmp_path, f"drafter={drafter}")
        assert cfg.drafter.lr == 1e-3 and cfg.drafter.batch_size == 4  # inherited from eagle2
        _, meta = train_tiny(tmp_path, cache_dir, f"drafter={drafter}")
        keys[drafter] = meta["key"]
        objective = {"eagle2": "Eagle2Objective", "hass": "HassObjective"}[drafter]
        assert meta["drafter"]["objective"]["_target_"].endswith(objective)
    assert keys["eagle2"] != keys["hass"]
    assert "step3/loss" in str(meta["final_metrics"])


def test_two_stage_schedule(tmp_path, cache_dir):
    """Stage 1 (epoch 0) trains without top-K distillation; stage 2 with it at lr x 0.1."""
    import lightning as L

    from tests.test_training import train_tiny

    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            seen.append((trainer.current_epoch, module._first_stage(), lr))

    settings = ["drafter=hass", "drafter.two_stage=true", "trainer.max_epochs=2",
                "data.components=[{source: mathinstruct, examples: 30}]"]  # fmt: skip
    _, meta = train_tiny(tmp_path, cache_dir, *settings, callbacks=[Record()])
    assert all(first == (epoch == 0) for epoch, first, _ in seen)
    last0 = [lr for e, _, lr in seen if e == 0][-1]
    first1 = [lr for e, _, lr in seen if e == 1][0]
    assert 0.05 * last0 < first1 < 0.15 * last0
    _, one = train_tiny(tmp_path, cache_dir, *settings[:1], *settings[2:])
    assert one["key"] != meta["key"]  # the schedule is part of the drafter's identity


def test_hass_config_builds_its_objective(tmp_path):
    from tests.test_training import tiny_cfg

    objective = build_objective(tiny_cfg(tmp_path, "drafter=hass").drafter)
    assert isinstance(objective, HassObjective)
    assert (objective.steps, objective.topk, objective.topk_weight) == (3, 10, 1.0)
    assert objective.weights == LossWeights(1.0, 0.1)  # inherited from eagle2.yaml
    assert objective.first_stage() == HassObjective(1.0, 0.1, 3, 10, 0.0)
    cfg = tiny_cfg(tmp_path, "drafter=hass", "drafter.objective.steps=2")
    assert build_objective(cfg.drafter).steps == 2
    cfg = tiny_cfg(tmp_path, "drafter=hass", "+drafter.objective.stepz=2")
    with pytest.raises(Exception, match="stepz"):  # a misspelt option is named
        build_objective(cfg.drafter)


def test_two_stage_needs_an_objective_with_stages(tmp_path, cache_dir, tiny64):
    from tests.test_training import train_tiny

    with pytest.raises(ValueError, match=r"drafter\.two_stage"):
        train_tiny(tmp_path, cache_dir, "+drafter.two_stage=true")  # EAGLE-2: no stages
    assert not (tmp_path / "drafters").exists()  # it failed before any training
    head = DraftHead.for_target(tiny64.model)
    with pytest.raises(ValueError, match=r"drafter\.two_stage"):
        DraftModule(head, Eagle2Objective(), stage2_epoch=1)


def test_objectives_compute_the_reference_losses(tiny64):
    head, f_in, tokens, f_next, mask = head_and_batch(tiny64)
    w = LossWeights(0.5, 0.2)
    got, m = Eagle2Objective(0.5, 0.2)(head, f_in, tokens, f_next, mask)
    want, _ = eagle_loss(head(f_in, tokens), f_next, mask, head.lm_head_weight, w)
    assert torch.equal(got, want) and "topk_loss" not in m
    hass = HassObjective(0.5, 0.2, 2, 5, 0.7)
    for objective, topk_weight in ((hass, 0.7), (hass.first_stage(), 0.0)):
        got, _ = objective(head, f_in, tokens, f_next, mask)
        want, _ = hass_loss(head, f_in, tokens, f_next, mask, w, HassConfig(2, 5, topk_weight))
        assert torch.equal(got, want)


def test_rollout_metrics_chain_acceptance(monkeypatch):
    """Top-1 per depth and the simulated chain acceptance from a known pattern of hits."""
    import taps.training.metrics as metrics_mod

    n, v = 6, 8
    want = torch.tensor([1, 2, 3, 4, 5, 6])
    hits = {1: {0, 1, 2, 3, 4, 5}, 2: {1, 2, 3}, 3: {3}}  # depth -> positions drafted right

    def out(d):
        return torch.stack([F.one_hot(want[t] if t in hits[d] else torch.tensor(0), v).double()
                            for t in range(n)])[None]  # fmt: skip

    class Head:
        lm_head_full = torch.eye(v, dtype=torch.float64)

        def logits(self, g):
            return g @ self.lm_head_full.T

        def to_target(self, i):
            return i

    monkeypatch.setattr(metrics_mod, "hass_forward", lambda *a: [out(1), out(2), out(3)])
    f_next = F.one_hot(want, v).double()[None]
    m = metrics_mod.rollout_metrics(Head(), None, None, f_next, torch.ones(1, n), 3)
    assert m["top1_d1"] == 1 and m["top1_d2"] == 0.5 and abs(m["top1_d3"] - 1 / 6) < 1e-9
    # Chains from s = 0..5 accept 2, 3, 2, 1, 1, 1 tokens.
    assert abs(float(m["sim_tau"]) - (1 + 10 / 6)) < 1e-6
    # The target's argmax as EAGLE-3 features store it gives the same metrics; another does not.
    mask = torch.ones(1, n)
    assert metrics_mod.rollout_metrics(Head(), None, None, f_next, mask, 3, want[None]) == m
    other = metrics_mod.rollout_metrics(Head(), None, None, f_next, mask, 3, want[None] + 1)
    assert other["top1_d1"] < 1
