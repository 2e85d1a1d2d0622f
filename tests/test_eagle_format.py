"""EAGLE-1/2 layout: export/import round trips exactly, a hand-written checkpoint in the published
layout loads, bad checkpoints fail naming file and key, the CLI exports, and a run can use a
pretrained head without training."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from taps.models.draft_head import DraftHead
from taps.models.eagle_format import export_eagle, load_eagle
from taps.models.heads import save_head
from taps.models.llama import Llama
from taps.models.serving import load_pretrained
from taps.paths import REPO_ROOT
from taps.training.train import ensure_drafter
from tests.test_run import TINY, cfg_with

# The published names, spelled out rather than derived from the code under test.
PUBLISHED = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    "layer.self_attn.q_proj.weight": "layers.0.self_attn.q_proj.weight",
    "layer.self_attn.k_proj.weight": "layers.0.self_attn.k_proj.weight",
    "layer.self_attn.v_proj.weight": "layers.0.self_attn.v_proj.weight",
    "layer.self_attn.o_proj.weight": "layers.0.self_attn.o_proj.weight",
    "layer.self_attn.q_proj.bias": "layers.0.self_attn.q_proj.bias",
    "layer.self_attn.k_proj.bias": "layers.0.self_attn.k_proj.bias",
    "layer.self_attn.v_proj.bias": "layers.0.self_attn.v_proj.bias",
    "layer.mlp.gate_proj.weight": "layers.0.mlp.gate_proj.weight",
    "layer.mlp.up_proj.weight": "layers.0.mlp.up_proj.weight",
    "layer.mlp.down_proj.weight": "layers.0.mlp.down_proj.weight",
    "layer.post_attention_layernorm.weight": "layers.0.post_attention_layernorm.weight",
}


def random_head(target: Llama, bias: bool = True, d2t=None, config=None, seed: int = 1):
    """A head with every parameter randomised (norm weights and biases too), so a name or
    tensor mix-up changes the outputs."""
    torch.manual_seed(seed)
    t = target
    head = DraftHead(
        config or t.config, t.model.embed_tokens.weight, t.lm_head.weight, bias=bias, d2t=d2t
    ).to(t.lm_head.weight.dtype)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layernorm" in name else 0.0))
    return head.eval()


def outputs(head: DraftHead, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = head.fc.weight.shape[0]
    feats = torch.randn(2, 7, h, generator=g, dtype=head.fc.weight.dtype)
    tokens = torch.randint(0, head.embed_weight.shape[0], (2, 7), generator=g)
    with torch.no_grad():
        return head.logits(head(feats, tokens))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("draft_vocab", [None, 100])
def test_round_trip_is_exact(tiny64, tmp_path, fmt, bias, draft_vocab):
    d2t = None if draft_vocab is None else torch.randperm(1024)[:draft_vocab]
    head = random_head(tiny64.model, bias=bias, d2t=d2t)
    out = export_eagle(head, tiny64.model.config, tmp_path / "eagle", fmt=fmt)
    files = sorted(p.name for p in out.iterdir())
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    assert files == ["config.json", weights]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 1
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 1024
    assert cfg["num_key_value_heads"] == 2 and cfg["rope_theta"] == 10000.0
    assert cfg["bias"] is bias and cfg["eagle_fc_bias"] is bias
    assert cfg.get("draft_vocab_size") == draft_vocab
    state = (
        load_file(str(out / weights))
        if fmt == "safetensors"
        else torch.load(out / weights, weights_only=True)
    )
    want = {PUBLISHED[k] for k in head.state_dict() if k != "d2t"} | {"embed_tokens.weight"}
    assert set(state) == want | ({"d2t"} if draft_vocab else set())
    assert torch.equal(state["embed_tokens.weight"], tiny64.model.model.embed_tokens.weight)

    loaded, meta = load_eagle(out, tiny64.model)
    assert meta["weights"] == weights and meta["format"] == "eagle"
    assert (loaded.fc.bias is not None) is bias
    if draft_vocab:
        assert torch.equal(loaded.d2t, head.d2t)
    else:
        assert loaded.d2t is None
    assert loaded.vocab_size == (draft_vocab or 1024)
    assert torch.equal(outputs(loaded), outputs(head))


def test_export_replaces_previous_export(tiny64, tmp_path):
    first = random_head(tiny64.model, seed=1)
    second = random_head(tiny64.model, seed=3)
    export_eagle(first, tiny64.model.config, tmp_path / "eagle")
    export_eagle(second, tiny64.model.config, tmp_path / "eagle", embed=False)
    assert "embed_tokens.weight" not in load_file(str(tmp_path / "eagle" / "model.safetensors"))
    assert torch.equal(outputs(load_eagle(tmp_path / "eagle", tiny64.model)[0]), outputs(second))
    assert [p.name for p in tmp_path.iterdir()] == ["eagle"]  # no temporary dirs left


def write_published(head: DraftHead, directory: Path, target: Llama, drop=(), extra=None) -> Path:
    """A checkpoint as EAGLE's training code writes it: pytorch_model.bin + LlamaConfig."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {PUBLISHED[k]: v.clone() for k, v in head.state_dict().items() if k not in drop}
    state["embed_tokens.weight"] = target.model.embed_tokens.weight.clone()
    state.update(extra or {})
    torch.save(state, directory / "pytorch_model.bin")
    c = target.config
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "num_hidden_layers": 1,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "bias": head.fc.bias is not None,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_published_layout_loads(tiny64, tmp_path):
    head = random_head(tiny64.model)
    loaded, _ = load_eagle(write_published(head, tmp_path / "pub", tiny64.model), tiny64.model)
    assert torch.equal(outputs(loaded), outputs(head))
    # The head uses the target's own embedding and LM head (shared, not copies of the file).
    assert torch.equal(loaded.embed_weight, tiny64.model.model.embed_tokens.weight)


def test_published_qkv_bias_without_fc_bias(tiny64, tmp_path):
    """Some published heads have q/k/v biases (Qwen2-style) and no fc bias."""
    config = copy.deepcopy(tiny64.model.config)
    config.attention_bias = True  # gives q/k/v *and* o biases; the file has no o bias
    head = random_head(tiny64.model, bias=False, config=config)
    with torch.no_grad():
        head.layer.self_attn.o_proj.bias.zero_()
    path = write_published(
        head, tmp_path / "pub", tiny64.model, drop={"layer.self_attn.o_proj.bias"}
    )
    loaded, _ = load_eagle(path, tiny64.model)
    assert loaded.fc.bias is None and loaded.layer.self_attn.q_proj.bias is not None
    assert torch.equal(outputs(loaded), outputs(head))
    plain = random_head(tiny64.model, bias=False)  # the same file without its biases differs
    assert not torch.allclose(outputs(loaded), outputs(plain))


def test_different_embedding_warns(tiny64, tmp_path, caplog):
    head = random_head(tiny64.model)
    other = tiny64.model.model.embed_tokens.weight + 0.5
    path = write_published(
        head, tmp_path / "pub", tiny64.model, extra={"embed_tokens.weight": other}
    )
    with caplog.at_level(logging.WARNING, logger="taps.models.eagle_format"):
        loaded, _ = load_eagle(path, tiny64.model)
    assert "embed_tokens.weight differs" in caplog.text
    assert torch.equal(outputs(loaded), outputs(head))  # the target's embedding is used
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="taps.models.eagle_format"):
        load_eagle(write_published(head, tmp_path / "same", tiny64.model), tiny64.model)
    assert "differs" not in caplog.text


def _tamper(path: Path, fn) -> Path:
    f = path / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f))
    return f


def test_hidden_size_mismatch(tiny64, tmp_path):
    small = LlamaConfig(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    other = Llama(small).double()
    path = export_eagle(random_head(other), small, tmp_path / "eagle")
    with pytest.raises(ValueError, match=r"model\.safetensors.*'fc\.weight'.*hidden size"):
        load_eagle(path, tiny64.model)


def test_vocab_mismatch(tiny64, tmp_path):
    path = export_eagle(random_head(tiny64.model), tiny64.model.config, tmp_path / "a")
    _tamper(path, lambda s: s.update({"embed_tokens.weight": s["embed_tokens.weight"][:512]}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*'embed_tokens\.weight'.*vocab"):
        load_eagle(path, tiny64.model)
    # Without the embedding in the file, config.json's vocab_size still catches it.
    path = export_eagle(random_head(tiny64.model), tiny64.model.config, tmp_path / "b", False)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 512}))
    with pytest.raises(ValueError, match=r"config\.json: vocab_size=512"):
        load_eagle(path, tiny64.model)


def test_missing_and_unsupported_keys(tiny64, tmp_path):
    head = random_head(tiny64.model)
    path = export_eagle(head, tiny64.model.config, tmp_path / "a")
    _tamper(path, lambda s: s.pop("layers.0.mlp.down_proj.weight"))
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*'layers\.0\.mlp\.down_proj\.weight'"
    ):
        load_eagle(path, tiny64.model)
    # A second layer (or EAGLE-3's midlayer) cannot be represented: refuse, do not drop it.
    path = export_eagle(head, tiny64.model.config, tmp_path / "b")
    _tamper(path, lambda s: s.update({"layers.1.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unsupported key 'layers\.1\.mlp\.up_proj\.weight'"):
        load_eagle(path, tiny64.model)
    # A wrong shape elsewhere (another intermediate size) names its key.
    path = export_eagle(head, tiny64.model.config, tmp_path / "c")
    _tamper(path, lambda s: s.update({"layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.up_proj\.weight' has shape"):
        load_eagle(path, tiny64.model)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_corrupt_weight_file(tiny64, tmp_path, fmt):
    path = export_eagle(random_head(tiny64.model), tiny64.model.config, tmp_path / "e", fmt=fmt)
    (weights,) = [p for p in path.iterdir() if p.name != "config.json"]
    weights.write_bytes(b"\x00garbage, not a weight file" * 10)
    with pytest.raises(ValueError, match=rf"{weights.name}: unreadable weight file"):
        load_eagle(path, tiny64.model)
    weights.unlink()
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        load_eagle(path, tiny64.model)


def trained_dir(tiny64, tmp_path: Path, key: str | None = None) -> tuple[DraftHead, Path]:
    """A drafter directory as training writes it (save_head)."""
    head = random_head(tiny64.model, d2t=torch.arange(0, 1024, 3))
    ckpt = tmp_path / "drafters" / "eagle2-mix-0123"
    save_head(head, ckpt, {"target": {"name": tiny64.name, "key": key or tiny64.key}})
    return head, ckpt


def test_export_cli(tiny64, tmp_path):
    from taps.export import main

    head, ckpt = trained_dir(tiny64, tmp_path)
    args = ["target=tiny_random", "target.dtype=float64", f"ckpt={ckpt}", "engine=eagle"]
    out = main([*args, "weights=bin"])
    assert out == ckpt.with_name(ckpt.name + "-eagle")
    assert (out / "pytorch_model.bin").is_file()
    loaded, _ = load_eagle(out, tiny64.model)
    assert torch.equal(outputs(loaded), outputs(head))
    assert torch.equal(loaded.d2t, head.d2t)
    # Another target than the one the head was trained on is refused.
    _, other = trained_dir(tiny64, tmp_path / "other", key="0000")
    with pytest.raises(ValueError, match="pass the matching target"):
        main(["target=tiny_random", f"ckpt={other}", f"out={tmp_path / 'x'}", "engine=eagle"])
    assert not (tmp_path / "x").exists()


def test_export_cli_missing_ckpt(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "taps.export", "target=tiny_random", f"ckpt={missing}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"ckpt={missing} does not exist" in proc.stderr


def test_run_uses_pretrained_without_training(tiny64, tmp_path):
    head = random_head(tiny64.model, bias=False)
    exported = export_eagle(head, tiny64.model.config, tmp_path / "eagle")
    cfg = cfg_with([*TINY, "drafter=eagle_pretrained", f"drafter.path={exported}"], tmp_path)
    assert cfg.drafter.objective is None  # not trained
    with open_dict(cfg):
        cfg.data.components = []  # no data is needed, so none may be read
    cache = tmp_path / "cache"
    loaded, meta = ensure_drafter(
        tiny64, cfg.drafter, cfg.data, cfg.trainer, str(cache), cfg.paths.data_dir, cfg.seed
    )
    assert meta["source"] == str(exported)
    assert torch.equal(outputs(loaded), outputs(head))
    assert not cache.exists()  # nothing trained, no features computed
    # A drafter directory written by training is accepted too.
    trained, ckpt = trained_dir(tiny64, tmp_path)
    with open_dict(cfg):
        cfg.drafter.path = str(ckpt)
    loaded, _ = ensure_drafter(
        tiny64, cfg.drafter, cfg.data, cfg.trainer, str(cache), cfg.paths.data_dir, cfg.seed
    )
    assert torch.equal(outputs(loaded), outputs(trained))


def test_pretrained_hub_id(tiny64, tmp_path, monkeypatch):
    import huggingface_hub

    head = random_head(tiny64.model)
    exported = export_eagle(head, tiny64.model.config, tmp_path / "eagle")
    calls = []

    def fake_download(repo_id, **kw):
        calls.append(repo_id)
        return str(exported)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded, _ = load_pretrained("someone/EAGLE-tiny", tiny64.model)
    assert calls == ["someone/EAGLE-tiny"]
    assert torch.equal(outputs(loaded), outputs(head))

    def offline(repo_id, **kw):
        raise OSError("offline: no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"someone/EAGLE-tiny.*could not download.*offline"):
        load_pretrained("someone/EAGLE-tiny", tiny64.model)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_pretrained(str(tmp_path / "missing" / "dir"), tiny64.model)
