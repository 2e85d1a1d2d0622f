"""Our lean Llama must compute what transformers' LlamaForCausalLM computes, with and without
its KV cache, and the cache must compact correctly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from taps.engine.tree import chain_tree, verification_inputs
from taps.models.llama import one_query_attention


def hf_copy(model) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(model.config).to(model.lm_head.weight.dtype)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf.eval()


def test_tiny_logits_match_transformers(tiny64):
    m = tiny64.model
    x = torch.randint(0, m.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    ours = m.logits(m(x))
    ref = hf_copy(m)(x).logits
    # transformers computes rotary and norms in float32 even for float64 weights.
    assert (ours - ref).abs().max() < 1e-4


def test_cache_matches_full_forward(tiny64):
    m = tiny64.model
    x = torch.randint(0, m.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    full = m(x)[0]
    cache = m.new_cache(32)
    parts = [m(x[:, :7], cache=cache)[0], m(x[:, 7:8], cache=cache)[0], m(x[:, 8:], cache=cache)[0]]
    assert torch.allclose(torch.cat(parts), full, atol=1e-10)
    assert cache.length == 20


def test_tree_mask_equals_decoding_each_path(tiny64):
    """Every node of a two-branch tree verified in one forward gets the features it would get
    from decoding its own root-to-node path; after `keep`, the cache equals that path's."""
    m = tiny64.model
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, m.config.vocab_size, (1, 9), generator=g)
    tree = chain_tree(5, [6, 7, 8], [-0.1] * 3, [0.0] * 3)
    tree.tokens = torch.tensor([5, 6, 7, 8, 11, 12])
    tree.parents = [-1, 0, 1, 2, 0, 4]
    tree.__post_init__()
    cache = m.new_cache(32)
    m(prefix, cache=cache)
    tokens, pos, mask = verification_inputs(tree, 9, "cpu")
    feats = m(tokens, pos, cache, mask)[0]
    for node in range(len(tree)):
        path = tree.tokens[tree.path_to(node)]
        ref = m(torch.cat([prefix[0], path])[None])[0, -1]
        assert torch.allclose(feats[node], ref, atol=1e-10), node
    cache.keep(9, torch.tensor(tree.path_to(5)))
    assert cache.length == 12
    nxt = m(torch.tensor([[3]]), cache=cache)[0, -1]
    ref = m(torch.cat([prefix[0], torch.tensor([5, 11, 12, 3])])[None])[0, -1]
    assert torch.allclose(nxt, ref, atol=1e-10)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    m = smollm2.model
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576
    x = torch.tensor([smollm2.tokenizer("The capital of France is")["input_ids"]])
    ours = m.logits(m(x))
    ref = hf_copy(m)(x).logits
    assert (ours - ref).abs().max() < 1e-3
    assert int(ours[0, -1].argmax()) == int(ref[0, -1].argmax())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_adapter_matches_transformers(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from taps.models.llama import Llama

    config = AutoConfig.for_model(
        family,
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).double().eval()
    for p in ref.parameters():  # random biases and norm weights, so the test can fail
        torch.nn.init.normal_(p, std=0.2)
    ours = Llama(config).double().eval()
    missing = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    x = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        assert (ours.logits(ours(x)) - ref(x).logits).abs().max() < 1e-4


def test_one_query_attention_equals_sdpa():
    """The written-out path of batched one-token decoding (grouped heads, bool mask) is SDPA's
    attention; a wrong head grouping or mask broadcast fails here."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 1, 1, 5, generator=g) > 0.4
    mask[..., 0] = True
    for m in (mask, None):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(one_query_attention(q, k, v, m), want)
