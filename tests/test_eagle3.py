"""The EAGLE-3 head: training-time test masks and steps, its equality with inference drafting,
the engine's feedback of the head's own hidden state, and lossless decoding with it."""

from __future__ import annotations

import pytest
import torch

from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.eagle3_head import Eagle3Head, default_aux_layers
from taps.models.heads import build_head, load_head, save_head
from taps.training.eagle3 import draft_targets, eagle3_loss, ttt_forward
from taps.training.hass import alignment_mask
from taps.training.losses import supervised
from taps.training.objectives import Eagle3Objective
from tests.helpers import AUX
from tests.test_engine_greedy import prompts
from tests.test_hass import visible


def eagle3(tiny, seed: int = 0, d2t: bool = True) -> Eagle3Head:
    torch.manual_seed(seed)
    v = tiny.model.config.vocab_size
    ids = torch.randperm(v)[: v // 2].sort().values if d2t else None
    head = Eagle3Head.for_target(tiny.model, AUX, ids)
    with torch.no_grad():  # a random head, but one whose layer and head weights all matter
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head.eval()


def batch(tiny, b: int = 2, n: int = 9):
    g = torch.Generator().manual_seed(1)
    h = tiny.model.config.hidden_size
    aux = torch.randn(b, n, 3 * h, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 1000, (b, n), generator=g)
    f_next = torch.randn(b, n, h, generator=g, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.uint8)
    mask[1, 6:] = 0  # right padding in the second row
    return aux, tokens, f_next, mask


def test_ttt_masks_pin_every_key_per_step():
    """Step k+1's query r sees real keys t <= r-k and one key of each earlier step, t = r-k+j
    (the masks HASS's context alignment uses; EAGLE-3's TTT reuses them)."""
    n = 6
    assert visible(alignment_mask(n, 0), n)[2] == [(0, 0), (0, 1), (0, 2)]
    assert visible(alignment_mask(n, 3), n)[5] == [(0, 0), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5)]
    assert visible(alignment_mask(n, 3), n)[1] == [(2, 0), (3, 1)]  # no real key left


def test_step_one_is_plain_single_step_training(tiny64):
    head = eagle3(tiny64)
    aux, tokens, f_next, mask = batch(tiny64)
    loss, m = eagle3_loss(head, aux, tokens, f_next, mask, steps=1, decay=0.8)
    g = head(head.fuse(aux), tokens)  # one causal forward, no unrolling
    rows = supervised(mask)
    p, keep = draft_targets(head, f_next, rows)
    ce = -(p * torch.log_softmax(head.logits(rows.of(g)), -1)).sum(-1)
    assert torch.allclose(loss, (ce * keep).sum() / mask.sum(), atol=1e-12)
    assert set(m) >= {"step1/token_loss", "step1/top1", "token_loss", "top1", "loss"}


def test_steps_are_weighted_by_decay_and_padding_is_invisible(tiny64):
    head = eagle3(tiny64)
    aux, tokens, f_next, mask = batch(tiny64)
    loss, m = eagle3_loss(head, aux, tokens, f_next, mask, steps=3, decay=0.5)
    parts = [m[f"step{k}/token_loss"] for k in (1, 2, 3)]
    assert torch.allclose(loss, parts[0] + 0.5 * parts[1] + 0.25 * parts[2], atol=1e-10)
    aux2, t2 = aux.clone(), tokens.clone()
    aux2[1, 7:] += 3.0
    t2[1, 7:] = 5
    same, _ = eagle3_loss(head, aux2, t2, f_next, mask, steps=3, decay=0.5)
    assert torch.allclose(loss, same, atol=1e-10)


def test_positions_outside_the_draft_vocabulary_are_masked(tiny64):
    head = eagle3(tiny64)
    _, _, f_next, mask = batch(tiny64)
    rows = supervised(mask)
    _, keep = draft_targets(head, f_next, rows)
    full = (f_next[mask.bool()] @ head.lm_head_full.T).argmax(-1)
    real = int(mask.sum())
    assert keep[:real].tolist() == [bool((head.d2t == t).any()) for t in full.tolist()]
    assert not keep[real:].any()  # padding rows never count
    assert 0 < int(keep.sum()) < len(keep)  # both kinds occur in this batch
    top = (f_next @ head.lm_head_full.T).argmax(-1)  # as the feature pass stores it
    assert torch.equal(draft_targets(head, f_next, rows, top)[1], keep)


def _convs(k: int = 4) -> list:
    from taps.data.conversations import Conversation

    return [Conversation(({"role": "user", "content": f"What is {i}+{i}? Say it twice."},
                          {"role": "assistant", "content": f"It is {2 * i}. " * (i + 3) + "Done, bye."}),
                         "t", str(i)) for i in range(k)]  # fmt: skip


def test_feature_pass_stores_the_targets_argmax_for_eagle3_only(tiny64, tmp_path):
    """EAGLE-3 feature entries hold argmax(W f) at every position, computed once instead of
    every training step; EAGLE-2's entries (and keys) stay as they were."""
    from taps.training.features import cached_features, compute_features

    fs = compute_features(tiny64, _convs(), 256, "float64", aux_layers=AUX)
    full = (fs.features @ tiny64.model.lm_head.weight.T).argmax(-1)
    assert fs.target_argmax.dtype == torch.int32 and torch.equal(fs.target_argmax.long(), full)
    assert len(set(full.tolist())) > 5  # a position shift would not go unnoticed
    cached = cached_features(tiny64, _convs(), tmp_path, 256, "float64", aux_layers=AUX)
    assert torch.equal(cached.target_argmax, fs.target_argmax)
    assert cached_features(tiny64, _convs(), tmp_path, 256, "float64").target_argmax is None
    assert compute_features(tiny64, _convs(), 256, "float64").target_argmax is None


def test_stored_argmax_trains_exactly_as_the_argmax_computed_per_step(tiny64):
    """The pairs carry the argmax at f_next's position (t+1): the loss equals the one that
    computes it from f_next, and a pair whose argmax is off by one position does not."""
    from taps.training.datamodule import PairDataset, collate
    from taps.training.features import compute_features

    fs = compute_features(tiny64, _convs(), 256, "float64", aux_layers=AUX)
    b = collate([PairDataset(fs)[i] for i in range(len(fs))])
    head = eagle3(tiny64)
    args = (head, b["f_in"], b["tokens"], b["f_next"], b["mask"], 3, 0.8)
    want, _ = eagle3_loss(*args)
    got, _ = eagle3_loss(*args, b["top"])
    assert torch.allclose(got, want, atol=1e-12)
    shifted, _ = eagle3_loss(*args, torch.roll(b["top"], 1, dims=1))
    assert not torch.allclose(shifted, want, atol=1e-6)


def test_ttt_step_k_equals_inference_drafting_at_depth_k(tiny64):
    """g^{k+1}[r] must equal what the head computes at inference when the real features stop
    at r-k and it feeds its own pre-norm output back k times (teacher-forced tokens)."""
    head = eagle3(tiny64)
    aux, tokens, _, _ = batch(tiny64)
    outs = ttt_forward(head, head.fuse(aux[:1]), tokens[:1], steps=4)
    for k in range(4):
        for r in range(k, 9):
            cache = head.new_cache(16)
            real = r - k + 1
            g = head(head.fuse(aux[:1, :real]), tokens[:1, :real], cache=cache)[0, -1]
            for p in range(real, r + 1):
                g = head(g[None, None], tokens[:1, p : p + 1], cache=cache)[0, -1]
            assert torch.allclose(outs[k][0, r], g, atol=1e-10), (k, r)


@torch.no_grad()
def _chain(head: Eagle3Head, tiny, prompt: list[int], depth: int, drawn: bool = False):
    """The engine's chain draft after `prompt` and the TTT rollout's predictions for it:
    (chain, the rollout's argmaxes, the tree's log-probs, the rollout's log-probs of the chain's
    tokens). drawn: a drawn chain (TreeSpec.sampled at T=1), tokens drawn from the head."""
    model = tiny.model
    states = model.states(torch.tensor([prompt]), capture=head.aux_layers)[0]
    root = int(model.logits(states.final[-1]).argmax())
    drafter = HeadDrafter(head, TreeSpec(1, depth - 1, depth + 1, sampled=drawn))
    if drawn:
        drafter.set_sampling(1.0, torch.Generator().manual_seed(0))
    drafter.start(states, torch.tensor(prompt[1:] + [root]), len(prompt) + 16)
    tree = drafter.propose()
    chain = tree.tokens[1:].tolist()
    # TTT over [prompt positions, then the drafted tokens]: positions past the prompt carry no
    # real feature (zeros), which the masks never let a depth-(k+1) output at n-1+k see.
    n = len(prompt)
    aux = torch.cat([states.layers[i] for i in head.aux_layers], -1)
    aux = torch.cat([aux, torch.zeros(depth - 1, aux.shape[1], dtype=aux.dtype)])[None]
    toks = torch.tensor([prompt[1:] + [root] + chain[:-1]])
    outs = ttt_forward(head, head.fuse(aux), toks, depth)
    rows = [torch.log_softmax(head.logits(outs[k][0, n - 1 + k]), -1) for k in range(depth)]
    want = [int(head.to_target(r.argmax())) for r in rows]
    every = head.to_target(torch.arange(rows[0].shape[-1])).tolist()  # draft index -> target id
    logps = [float(r[every.index(t)]) for r, t in zip(rows, chain, strict=True)]
    return chain, want, tree.logprobs[1:].tolist(), logps


@pytest.mark.parametrize("drawn", [False, True])
def test_engine_feeds_back_the_heads_own_hidden_state(tiny64, drawn):
    head = eagle3(tiny64)
    chain, want, got_lp, want_lp = _chain(head, tiny64, list(range(40, 52)), 4, drawn)
    assert chain == want or drawn
    assert got_lp == pytest.approx(want_lp, abs=1e-9)


@pytest.mark.parametrize("drawn", [False, True])
def test_wrong_feedback_fails_the_engine_check(tiny64, monkeypatch, drawn):
    """Feeding the next depth the normed output (what the LM head reads) instead of the
    pre-norm state breaks the equality above: the check has teeth."""
    head = eagle3(tiny64)
    real_forward = Eagle3Head.forward

    def normed(self, *args, **kwargs):
        return self.norm(real_forward(self, *args, **kwargs))

    monkeypatch.setattr(Eagle3Head, "forward", normed)
    _, _, got_lp, want_lp = _chain(head, tiny64, list(range(40, 52)), 4, drawn)
    assert got_lp != pytest.approx(want_lp, abs=1e-6)


@pytest.mark.parametrize("spec", [TreeSpec(1, 4, 6), TreeSpec(3, 3, 12), TreeSpec(10, 5, 60)])
def test_eagle3_drafter_greedy_lossless(tiny64, spec):
    head = eagle3(tiny64)
    dec = SpeculativeDecoder(tiny64.model, HeadDrafter(head, spec), tiny64.eos_ids)
    accepted = 0
    for p in prompts(5, tiny64.model.config.vocab_size, seed=1):
        out = dec.generate(p, 32)
        assert out.tokens == vanilla_generate(tiny64.model, p, 32, tiny64.eos_ids).tokens
        accepted += sum(c.accepted for c in out.cycles)
    assert accepted > 0  # drafts were accepted, so acceptance paths were exercised


def test_save_load_round_trip_and_kind_checks(tiny64, tmp_path):
    head = eagle3(tiny64)
    save_head(head, tmp_path, {"target": {"name": tiny64.name, "key": tiny64.key}})
    loaded, meta = load_head(tmp_path, tiny64.model)
    assert isinstance(loaded, Eagle3Head) and meta["kind"] == "eagle3"
    assert loaded.aux_layers == AUX and torch.equal(loaded.d2t, head.d2t)
    g = torch.randn(3, tiny64.model.config.hidden_size, dtype=torch.float64)
    assert torch.equal(loaded.logits(g), head.logits(g))
    assert default_aux_layers(30) == (2, 15, 27)  # SmolLM2: the reference's 2, L/2, L-3
    with pytest.raises(ValueError, match="fc has no bias"):
        build_head("eagle3", tiny64.model, bias=True)
    with pytest.raises(ValueError, match="outside 0..2"):
        build_head("eagle3", tiny64.model, bias=False, aux_layers=(1, 2, 3))
    with pytest.raises(ValueError, match="drafter.kind='eagle4'"):
        build_head("eagle4", tiny64.model)


def test_objective_checks_its_settings():
    with pytest.raises(ValueError, match="ttt_steps"):
        Eagle3Objective(steps=0)
    assert Eagle3Objective().steps == 7 and Eagle3Objective().decay == 0.8


@pytest.mark.parametrize("spec", [TreeSpec(1, 4, 6), TreeSpec(4, 3, 16)])
def test_trained_eagle3_drafter_is_accepted_and_lossless(tiny64, trained3, spec):
    dec = SpeculativeDecoder(tiny64.model, HeadDrafter(trained3, spec), tiny64.eos_ids)
    taus = []
    for p in prompts(5, tiny64.model.config.vocab_size, seed=1):
        p = p[:12] + [0] * (12 - len(p[:12]))  # the prompts it was trained on
        out = dec.generate(p, 32)
        assert out.tokens == vanilla_generate(tiny64.model, p, 32, tiny64.eos_ids).tokens
        taus.append(out.tau)
    assert sum(taus) / len(taus) > 1.5  # multi-token acceptances are exercised


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_eagle3_sampling_is_lossless(tiny64, trained3, temperature, top_p):
    """The chi-square test of tests/test_engine_sampling_e2e.py with an EAGLE-3 drafter."""
    from tests.test_engine_sampling_e2e import joint_test

    drafter = HeadDrafter(trained3, TreeSpec(3, 2, 8))
    p, tv = joint_test(tiny64, temperature, top_p, proposer=drafter)
    assert p > 1e-3, f"chi-square p={p:.2e} TV={tv:.3f}"


def test_eagle3_drawn_trees_sample_losslessly(tiny64, trained3):
    """The same with drafts drawn from the EAGLE-3 head (tree.sampled) and recursive rejection."""
    from tests.test_engine_sampling_e2e import joint_test

    drafter = HeadDrafter(trained3, TreeSpec(3, 2, 8, sampled=True))
    p, tv = joint_test(tiny64, 1.0, 1.0, proposer=drafter, samples=3000)
    assert p > 1e-3, f"chi-square p={p:.2e} TV={tv:.3f}"


def test_eagle3_drafter_config_trains_on_cached_aux_features(tmp_path, cache_dir):
    """drafter=eagle3 end to end on the tiny target: the feature pass stores the auxiliary
    layers (their ids in the key), training-time test runs, the head is saved and reloaded."""
    from tests.test_training import tiny_cfg, train_tiny

    cfg = tiny_cfg(tmp_path, "drafter=eagle3", "drafter.ttt_steps=3")
    assert cfg.drafter.objective.steps == 3 and cfg.drafter.kind == "eagle3"
    head, meta = train_tiny(tmp_path, cache_dir, "drafter=eagle3", "drafter.ttt_steps=3")
    assert isinstance(head, Eagle3Head) and head.aux_layers == default_aux_layers(2)
    assert meta["kind"] == "eagle3" and "step3/token_loss" in str(meta["final_metrics"])
    feats = meta["data"]["train_features"]
    assert feats["aux_layers"] == list(head.aux_layers)
    # The features of EAGLE-3 are a separate cache entry from EAGLE-2's.
    _, meta2 = train_tiny(tmp_path, cache_dir)
    assert meta2["data"]["train_features"]["aux_layers"] is None
    entries = {p.name for p in (tmp_path / "features").iterdir()}
    assert len(entries) == 4  # train and val, with and without auxiliary layers
    _, other = train_tiny(tmp_path, cache_dir, "drafter=eagle3", "drafter.ttt_steps=3",
                          "drafter.aux_layers=[1,2]")  # fmt: skip
    assert other["key"] != meta["key"] and other["aux_layers"] == [1, 2]


def test_average_of_eagle3_heads_unites_vocabularies_row_by_row(tiny64):
    from taps.combine.average import average_heads

    a, b = eagle3(tiny64, seed=1), eagle3(tiny64, seed=2)
    avg = average_heads([a, b], [0.25, 0.75])
    assert set(avg.d2t.tolist()) == set(a.d2t.tolist()) | set(b.d2t.tolist())
    assert torch.allclose(avg.fc.weight, 0.25 * a.fc.weight + 0.75 * b.fc.weight)
    rows = {int(t): i for i, t in enumerate(avg.d2t)}
    for head, other, w in ((a, b, 0.25), (b, a, 0.75)):
        for i, t in enumerate(head.d2t.tolist()[:50]):
            row = avg.lm_head.weight[rows[t]]
            if (other.d2t == t).any():  # in both: the weighted mean
                j = int((other.d2t == t).nonzero())
                want = w * head.lm_head.weight[i] + (1 - w) * other.lm_head.weight[j]
            else:  # in one: that head's row alone
                want = head.lm_head.weight[i]
            assert torch.allclose(row, want, atol=1e-12), t


@pytest.mark.parametrize(
    "routing,options",
    [("average", {}), ("confidence", {}), ("entropy", {}), ("merged_tree", {"budget": "matched"})],
)
def test_strategies_with_eagle3_heads_are_greedy_lossless(tiny64, trained3, routing, options):
    from taps.combine import build_proposer

    heads = [trained3, eagle3(tiny64, seed=4, d2t=False)]
    dec = SpeculativeDecoder(
        tiny64.model, build_proposer(routing, heads, TreeSpec(3, 3, 12), **options), set()
    )
    for p in prompts(3, tiny64.model.config.vocab_size, seed=1):
        p = p[:12] + [0] * (12 - len(p[:12]))
        assert dec.generate(p, 24).tokens == vanilla_generate(tiny64.model, p, 24, set()).tokens


def test_online_features_train_the_same_pairs_without_a_cache(tmp_path, cache_dir):
    """data.features=online: no feature pass is cached, every batch runs the frozen target,
    and the pairs it trains on equal the cached ones (same rounding to the stored dtype)."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from taps.data.conversations import Conversation
    from taps.training.datamodule import OnlineCollate, PairDataset, collate
    from taps.training.features import OnlineFeatures, compute_features, token_set
    from tests.test_training import tiny_cfg, train_tiny

    head, meta = train_tiny(tmp_path, cache_dir, "drafter=eagle3", "drafter.ttt_steps=2",
                            "data.features=online")  # fmt: skip
    assert not (tmp_path / "features").exists() and meta["data"]["train_features"]["online"]
    _, cached = train_tiny(tmp_path, cache_dir, "drafter=eagle3", "drafter.ttt_steps=2")
    assert cached["key"] != meta["key"]
    cfg = tiny_cfg(tmp_path)
    with open_dict(cfg):
        cfg.target.cache_dir = cache_dir
    target = instantiate(cfg.target)
    convs = [Conversation(({"role": "user", "content": f"What is {i}+{i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}), "t", str(i))
             for i in range(3)]  # fmt: skip
    fs = compute_features(target, convs, 64, "bfloat16", aux_layers=(1, 2))
    want = collate([PairDataset(fs)[i] for i in range(3)])
    online = OnlineCollate(OnlineFeatures(target, (1, 2), "bfloat16"))
    got = online([PairDataset(token_set(target, convs, 64))[i] for i in range(3)])
    for k in ("tokens", "mask"):
        assert torch.equal(got[k], want[k]), k
    agree = (got["top"] == want["top"])[want["mask"].bool()].float().mean()
    assert agree > 0.9  # the target's argmax; differently batched bf16 can flip near-ties
    for k in ("f_in", "f_next"):  # equal up to bf16 rounding of differently batched matmuls
        assert torch.allclose(got[k].float(), want[k].float(), atol=2e-2, rtol=2e-2), k
