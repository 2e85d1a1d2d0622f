"""Integration on the real SmolLM2-135M-Instruct target (converted from the shipped GGUF)."""

from __future__ import annotations

import pytest

from taps.data.template import prompt_ids
from taps.engine.decoder import SpeculativeDecoder, vanilla_generate
from tests.helpers import NoisyOracle

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "question", ["What is 17 times 23? Explain step by step.", "Write a haiku about the sea."]
)
def test_tree_verification_lossless_on_smollm2(smollm2, question):
    """A drafter that is often right (the target's own greedy continuation, corrupted at 30%)
    in a two-branch tree: outputs must equal vanilla greedy decoding token for token."""
    ids = prompt_ids(smollm2.tokenizer, [{"role": "user", "content": question}])
    ref = vanilla_generate(smollm2.model, ids, 40, smollm2.eos_ids)
    oracle = NoisyOracle(smollm2.model, depth=3, noise=0.3, seed=1)
    out = SpeculativeDecoder(smollm2.model, oracle, smollm2.eos_ids).generate(ids, 40)
    assert out.tokens == ref.tokens, smollm2.tokenizer.decode(out.tokens)
    assert out.tau > 1.5


def test_smollm2_target_and_template(smollm2):
    tok = smollm2.tokenizer
    assert smollm2.model.config.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in smollm2.eos_ids
    ids = prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_exported_target_is_a_plain_hf_directory(smollm2, tmp_path):
    """`taps.export what=target`: transformers loads it by its architecture and computes our
    logits (vLLM and SGLang pick their model class by the same field; make check-serving)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from taps.export import main

    out = main(["what=target", f"out={tmp_path / 'smollm2'}"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(smollm2.tokenizer, [{"role": "user", "content": "2+2?"}])])
    with torch.no_grad():
        want = smollm2.model.logits(smollm2.model(ids)[0])
        got = hf(ids).logits[0]
    assert torch.allclose(got, want, atol=1e-3)
