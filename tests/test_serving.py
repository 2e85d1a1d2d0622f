"""Exports for serving engines (taps/models/serving.py): each layout holds exactly the keys and
config fields its loader reads, and imports back with identical logits.

Key sets and fields come from the loaders (read in vLLM 0.33.0 and SGLang 0.5.23 wheels):
- vLLM `model_executor/models/llama_eagle.py` (EagleLlamaForCausalLM): loads `fc.weight`,
  `layers.0.*` without `input_layernorm`, optional `embed_tokens.weight`; refuses `lm_head`,
  `norm`, `d2t` and any unknown key; drops `fc.bias`; reads config `bias` as attention biases.
- vLLM `llama_eagle3.py` + `transformers_utils/configs/speculators/algos.py`: `fc.weight`,
  `layers.0.{input_layernorm,hidden_norm,post_attention_layernorm,self_attn,mlp}`, `norm`,
  `lm_head`, `d2t` (offsets), `t2d` (skipped); speculators config validated by
  `validate_speculators_config`; `norm_before_residual` defaults to true when absent.
- SGLang `models/llama_eagle.py`: fc with a bias; `--speculative-token-map` is a torch file of
  absolute target ids (`speculative/spec_utils.py:load_token_map`).
- SGLang `models/llama_eagle3.py`: `midlayer.*`, `d2t` offsets (hot ids = d2t + arange),
  `draft_vocab_size` must be a key, `bias` is the fc bias, aux ids in `eagle_config` plus one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from taps.models.draft_head import with_full_vocab
from taps.models.eagle_format import export_eagle
from taps.models.serving import export_head, fold_fc_bias, load_pretrained
from tests.test_eagle3 import eagle3
from tests.test_eagle_format import outputs, random_head

VLLM_EAGLE = {"fc.weight", "embed_tokens.weight"} | {
    f"layers.0.{k}.weight"
    for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm")
}  # fmt: skip
EAGLE3_LAYER = {
    f"{k}.weight"
    for k in ("input_layernorm", "hidden_norm", "post_attention_layernorm", "self_attn.q_proj",
              "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
}  # fmt: skip


def eagle3_outputs(head, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = head.fc.weight.shape[0]
    hidden = torch.randn(2, 7, h, generator=g, dtype=head.fc.weight.dtype)
    tokens = torch.randint(0, head.embed_weight.shape[0], (2, 7), generator=g)
    with torch.no_grad():
        return head.to_target(head.logits(head(hidden, tokens)).argmax(-1)), head.logits(
            head(hidden, tokens)
        )


@pytest.mark.parametrize("bias", [True, False])
def test_eagle2_vllm_layout_and_folded_bias(tiny64, tmp_path, bias):
    d2t = torch.arange(0, 1024, 3)
    head = random_head(tiny64.model, bias=bias, d2t=d2t)
    out = export_head(head, tiny64.model.config, tmp_path / "vllm", "vllm")
    cfg = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["attention_bias"] is False
    assert "bias" not in cfg and "draft_vocab_size" not in cfg
    assert set(state) == (VLLM_EAGLE if bias else VLLM_EAGLE - {"embed_tokens.weight"})
    if bias:  # W_e E'[x] equals W_e E[x] + b: the bias vLLM's fc lacks is in the embedding
        h = tiny64.model.config.hidden_size
        w_e = head.fc.weight[:, :h]
        folded = state["embed_tokens.weight"] @ w_e.T
        want = head.embed_weight @ w_e.T + head.fc.bias
        assert torch.allclose(folded, want, atol=1e-9)
    loaded, _ = load_pretrained(str(out), tiny64.model)
    # vLLM drafts EAGLE-1/2 heads over the full vocabulary: the import is that head.
    assert loaded.d2t is None
    assert torch.allclose(outputs(loaded), outputs(with_full_vocab(head)), atol=1e-9)


@pytest.mark.parametrize("bias,draft_vocab", [(True, True), (False, True), (True, False)])
def test_eagle2_sglang_layout_and_token_map(tiny64, tmp_path, bias, draft_vocab):
    d2t = torch.arange(0, 1024, 3) if draft_vocab else None
    head = random_head(tiny64.model, bias=bias, d2t=d2t)
    out = export_head(head, tiny64.model.config, tmp_path / "sglang", "sglang")
    cfg = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"] and "bias" not in cfg
    assert set(state) == (VLLM_EAGLE - {"embed_tokens.weight"}) | {"fc.bias"}
    if not bias:
        assert not state["fc.bias"].any()  # SGLang's fc always has one: explicit zeros
    token_map = out / "token_map.pt"
    assert token_map.is_file() is draft_vocab
    if draft_vocab:
        assert torch.equal(torch.load(token_map, weights_only=True), d2t)  # absolute ids
    loaded, _ = load_pretrained(str(out), tiny64.model)
    assert torch.equal(outputs(loaded), outputs(head))


@pytest.mark.parametrize("d2t", [True, False])
def test_eagle3_speculators_layout_for_vllm(tiny64, tmp_path, d2t):
    head = eagle3(tiny64, d2t=d2t)
    out = export_head(head, tiny64.model.config, tmp_path / "v3", "vllm", "org/target", 4)
    cfg = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    assert cfg["speculators_model_type"] == "eagle3" and cfg["norm_before_residual"] is False
    spec = cfg["speculators_config"]
    assert spec["proposal_methods"][0]["speculative_tokens"] == 4
    assert spec["verifier"]["name_or_path"] == "org/target"
    layer = cfg["transformer_layer_config"]
    assert layer["num_hidden_layers"] == 1 and layer["vocab_size"] == 1024
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["draft_vocab_size"] == head.vocab_size
    want = {"fc.weight", "norm.weight", "lm_head.weight"} | {f"layers.0.{k}" for k in EAGLE3_LAYER}
    assert set(state) == want | ({"d2t", "t2d"} if d2t else set())
    if d2t:  # offsets: target id = draft id + d2t[draft id]
        assert torch.equal(state["d2t"] + torch.arange(head.vocab_size), head.d2t)
        assert int(state["t2d"].sum()) == head.vocab_size and state["t2d"][head.d2t].all()
    loaded, meta = load_pretrained(str(out), tiny64.model)
    assert meta["format"] == "eagle3" and loaded.aux_layers == head.aux_layers
    for a, b in zip(eagle3_outputs(loaded), eagle3_outputs(head), strict=True):
        assert torch.equal(a, b)


def test_eagle3_sglang_layout(tiny64, tmp_path):
    head = eagle3(tiny64)
    out = export_head(head, tiny64.model.config, tmp_path / "s3", "sglang")
    cfg = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["draft_vocab_size"] == head.vocab_size and cfg["bias"] is False
    # SGLang captures the output of layer id (it adds one): ours minus one.
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 0, 1]
    assert {k for k in state if k.startswith("midlayer.")} == {
        f"midlayer.{k}" for k in EAGLE3_LAYER
    }
    loaded, _ = load_pretrained(str(out), tiny64.model)
    for a, b in zip(eagle3_outputs(loaded), eagle3_outputs(head), strict=True):
        assert torch.equal(a, b)


def test_old_export_layout_is_refused(tiny64, tmp_path):
    out = export_eagle(random_head(tiny64.model), tiny64.model.config, tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["taps_export"]  # as taps wrote it before engine-specific exports
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"older taps.*taps\.export ckpt=.*engine=vllm"):
        load_pretrained(str(out), tiny64.model)


def test_an_unfoldable_bias_is_refused(tiny64):
    head = random_head(tiny64.model, bias=True)
    with torch.no_grad():
        head.fc.weight[:, :3] = 0  # W_e singular: no embedding shift reproduces the bias
    with pytest.raises(ValueError, match=r"drafter\.bias=false"):
        fold_fc_bias(head)


def test_export_cli_engines_and_target(tiny64, tmp_path):
    from taps.export import main
    from tests.test_eagle_format import trained_dir

    head, ckpt = trained_dir(tiny64, tmp_path)
    args = ["target=tiny_random", "target.dtype=float64", f"ckpt={ckpt}"]
    out = main(args)  # engine=vllm by default
    assert out == ckpt.with_name(ckpt.name + "-vllm")
    assert json.loads((out / "config.json").read_text())["taps_export"]["engine"] == "vllm"
    out = main([*args, "engine=sglang"])
    assert (out / "token_map.pt").is_file()
    with pytest.raises(ValueError, match="engine=hf"):
        main([*args, "engine=hf"])


def test_check_serving_fails_on_any_difference(capsys):
    """make check-serving's verdict: identical outputs and acceptance within 2%, or it fails."""
    from tests.helpers import experiment_script

    check = experiment_script("check_serving").check
    mine = {"vanilla": [[1, 2], [3, 4]], "spec": [[1, 2], [3, 4]], "mean_acceptance_length": 2.0,
            "accepted": 10, "cycles": 10}  # fmt: skip
    base = {"tokens": [[1, 2], [3, 4]]}
    spec = {"tokens": [[1, 2], [3, 4]], "vllm_version": "x",
            "spec": {"mean_acceptance_length": 2.03, "accepted": 103, "drafts": 100}}  # fmt: skip
    assert check("d", mine, base, spec) == []  # 1.5% apart
    spec["spec"]["mean_acceptance_length"] = 2.05
    assert "acceptance" in check("d", mine, base, spec)[0]  # 2.5% apart
    spec["spec"]["mean_acceptance_length"] = 2.0
    spec["tokens"] = [[1, 2], [3, 5]]
    assert "outputs differ" in check("d", mine, base, spec)[0]
    assert "vLLM 2.0000" in capsys.readouterr().out
