"""Draft vocabulary (d2t): index mapping, selection from data, save/load, and losslessness."""

from __future__ import annotations

import torch

from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from taps.engine.drafting import HeadDrafter, TreeSpec
from taps.models.draft_head import DraftHead, with_full_vocab
from taps.models.heads import load_head, save_head
from taps.training.features import FeatureSet
from taps.training.vocab import frequent_tokens


def _tree(head, target, prompt):
    drafter = HeadDrafter(head, TreeSpec(4, 3, 16))
    states = target.model.states(torch.tensor([prompt]))[0]
    root = int(target.model.logits(states.final[-1]).argmax())
    drafter.start(states, torch.tensor(prompt[1:] + [root]), 64)
    return drafter.propose()


def test_permuted_full_vocabulary_drafts_the_same_tree(tiny64):
    torch.manual_seed(0)
    full = DraftHead.for_target(tiny64.model)
    perm = torch.randperm(tiny64.model.config.vocab_size)
    permuted = DraftHead.for_target(tiny64.model, d2t=perm)
    permuted.load_state_dict(full.state_dict(), strict=False)
    a, b = _tree(full, tiny64, [5, 9, 33, 7]), _tree(permuted, tiny64, [5, 9, 33, 7])
    # Same logits in another order: mapping indices back through d2t gives the same tree.
    assert a.tokens.tolist() == b.tokens.tolist() and a.parents == b.parents


def test_subset_drafts_only_its_tokens_and_stays_lossless(tiny64, tmp_path):
    torch.manual_seed(0)
    d2t = torch.arange(0, tiny64.model.config.vocab_size, 3)
    head = DraftHead.for_target(tiny64.model, d2t=d2t)
    tree = _tree(head, tiny64, [5, 9, 33, 7])
    assert set(tree.tokens[1:].tolist()) <= set(d2t.tolist())
    save_head(head, tmp_path, {})
    loaded, meta = load_head(tmp_path, tiny64.model)
    assert torch.equal(loaded.d2t, d2t) and meta["draft_vocab"] == len(d2t)
    assert torch.equal(loaded.lm_head_weight, tiny64.model.lm_head.weight[d2t])
    dec = SpeculativeDecoder(tiny64.model, HeadDrafter(loaded, TreeSpec(4, 3, 16)), set())
    for p in ([3, 4, 5], [100, 7, 8, 9, 10]):
        assert dec.generate(p, 24).tokens == vanilla_generate(tiny64.model, p, 24, set()).tokens


def test_frequent_tokens_counts_responses_only():
    ids = torch.tensor([1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 9])
    mask = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8)  # 4 is prompt-only
    fs = FeatureSet(ids, torch.zeros(11, 2), mask, torch.tensor([0, 11]), {})
    d2t, coverage = frequent_tokens(fs, 2, 16)
    assert d2t.tolist() == [2, 3] and abs(coverage - 5 / 6) < 1e-9
    d2t, _ = frequent_tokens(fs, 3, 16, always=[15])  # EOS kept however rare
    assert d2t.tolist() == [2, 3, 15]


def test_with_full_vocab_keeps_the_weights_and_scores_every_token(tiny64):
    torch.manual_seed(0)
    model = tiny64.model
    d2t = torch.arange(0, model.config.vocab_size, 3)
    head = DraftHead.for_target(model, d2t=d2t)
    full = with_full_vocab(head)
    assert full.d2t is None and full.vocab_size == model.config.vocab_size
    dt = model.lm_head.weight.dtype
    g = torch.randn(2, model.config.hidden_size, dtype=dt)
    # Same trained weights: the draft vocabulary's rows are those of the full logits.
    torch.testing.assert_close(full.logits(g)[:, d2t], head.logits(g))
    f, t = torch.randn(1, 3, model.config.hidden_size, dtype=dt), torch.tensor([[4, 5, 6]])
    assert torch.equal(full(f, t), head(f, t))
