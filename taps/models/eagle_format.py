"""Draft heads in the published EAGLE-1/2 layout (yuhuili/EAGLE-*; HASS heads use it too).

A directory with a LlamaConfig-style `config.json` and one weight file, `model.safetensors` or
`pytorch_model.bin`, whose names carry no "model." prefix: `fc.weight`, `fc.bias` (optional),
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
`layers.0.post_attention_layernorm.weight` (layer 0 has no input norm, as in our head) and
`embed_tokens.weight`, a copy of the target's embedding (EAGLE's loader reads it; vLLM and
SGLang share the target's instead).

Our draft vocabulary (`d2t`, draft index -> target id) has no EAGLE-1/2 counterpart: it is
written as an extra tensor `d2t` with `draft_vocab_size` in config.json and restored on import.
Engines that do not know it ignore it and draft over the target's full LM head, which is still
correct (the trained layers are the same; only the draft softmax covers more tokens).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from taps.models.draft_head import HEAD_VERSION, DraftHead
from taps.models.llama import Llama
from taps.paths import temp_dir_beside

log = logging.getLogger(__name__)

WEIGHT_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
REQUIRED = [
    "fc.weight",
    *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "layers.0.post_attention_layernorm.weight",
]
# Saved by old transformers versions as a buffer; recomputed from the config, so dropped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _ours(name: str) -> str:
    """EAGLE name -> DraftHead state-dict name (`layers.0.` is our `layer.`)."""
    return "layer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


def _theirs(name: str) -> str:
    return "layers.0." + name.removeprefix("layer.") if name.startswith("layer.") else name


def _rope(target_config: Any) -> dict:
    """rope_theta (+ rope_scaling when not the default) in the flat form older loaders read."""
    params = dict(getattr(target_config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", getattr(target_config, "rope_theta", 10000.0))
    out: dict[str, Any] = {"rope_theta": theta}
    if params.get("rope_type", "default") != "default":
        out["rope_scaling"] = params
    elif getattr(target_config, "rope_scaling", None):
        out["rope_scaling"] = target_config.rope_scaling
    return out


def layer_config(head: Any, target_config: Any) -> dict:
    """The LlamaConfig fields of a head's one decoder layer, from the target's config (every
    export layout starts from these)."""
    c, attn = target_config, head.layer.self_attn
    return {
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv,
        "head_dim": attn.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_norm_eps,
        **_rope(c),
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": head.embed_weight.shape[0],
        "hidden_act": getattr(c, "hidden_act", "silu"),
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        "tie_word_embeddings": False,
        "attention_bias": attn.q_proj.bias is not None,
        "mlp_bias": head.layer.mlp.gate_proj.bias is not None,
    }


def eagle_config(head: DraftHead, target_config: Any) -> dict:
    bias = head.fc.bias is not None
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        **layer_config(head, target_config),
        "bos_token_id": getattr(target_config, "bos_token_id", None),
        "eos_token_id": getattr(target_config, "eos_token_id", None),
        "bias": bias,  # EAGLE's own loader: fc bias
        "eagle_fc_bias": bias,  # vLLM's older EAGLE code
        "taps_head_version": HEAD_VERSION,
    }
    if head.d2t is not None:
        cfg["draft_vocab_size"] = int(head.d2t.numel())
    return cfg


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place, replacing an older export only once it is done."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_eagle(
    head: DraftHead,
    target_config: Any,
    out_dir: str | Path,
    embed: bool = True,
    fmt: str = "safetensors",
) -> Path:
    """Write `head` as config.json + model.safetensors (fmt="safetensors") or pytorch_model.bin
    (fmt="bin"). `embed` includes the target's embedding, which EAGLE's loader expects."""
    if fmt not in WEIGHT_FILES:
        raise ValueError(f"fmt={fmt!r}: expected one of {sorted(WEIGHT_FILES)}")
    if getattr(head.layer.self_attn, "qk_norm", False):
        raise ValueError("a Qwen3 (q/k-norm) head has no EAGLE-1/2 Llama layout")
    state = {_theirs(k): v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    cfg = eagle_config(head, target_config)
    # EAGLE's own loader (not vLLM's or SGLang's: python -m taps.export engine=vllm|sglang)
    cfg["taps_export"] = {"version": 2, "engine": "eagle", "kind": "eagle2"}
    o_bias = "layers.0.self_attn.o_proj.bias"
    if cfg["attention_bias"] and o_bias not in state:
        # Qwen2-style q/k/v biases: a LlamaConfig(attention_bias=True) also has an o bias;
        # zeros keep such loaders exact.
        o = state["layers.0.self_attn.o_proj.weight"]
        state[o_bias] = torch.zeros(o.shape[0], dtype=o.dtype)
    if embed:
        state["embed_tokens.weight"] = head.embed_weight.detach().cpu().clone()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        if fmt == "safetensors":
            save_file(state, str(tmp / WEIGHT_FILES[fmt]), metadata={"format": "pt"})
        else:
            torch.save(state, tmp / WEIGHT_FILES[fmt])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    for name in WEIGHT_FILES.values():
        f = path / name
        if f.is_file():
            break
    else:
        raise ValueError(f"{path}: no {' or '.join(WEIGHT_FILES.values())} (not an EAGLE head?)")
    try:
        if f.suffix == ".safetensors":
            return load_file(str(f)), f
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle/zip errors have unrelated types; name the file
        raise ValueError(f"{f}: unreadable weight file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{f}: expected a dict of tensors")
    return state, f


def _same_embedding(a: Tensor, b: Tensor, rows: int = 8192) -> bool:
    """Equal up to the rounding of the coarser dtype (exports may be in another precision);
    in row chunks so a 128k-vocabulary comparison does not double memory."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    for i in range(0, a.shape[0], rows):
        x, y = a[i : i + rows].float(), b[i : i + rows].float().to(a.device)
        if not torch.allclose(x, y, rtol=4 * eps, atol=4 * eps * float(y.abs().max())):
            return False
    return True


def _check_sizes(
    state: dict[str, Tensor], meta: dict, wfile: Path, cfile: Path, target: Llama
) -> None:
    """The required weights are there, and the hidden size and vocabulary are the target's."""
    h, vocab = target.config.hidden_size, target.lm_head.weight.shape[0]
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{wfile}: missing required key {missing[0]!r} (missing: {missing})")
    if state["fc.weight"].shape != (h, 2 * h):
        raise ValueError(
            f"{wfile}: 'fc.weight' has shape {tuple(state['fc.weight'].shape)}, expected "
            f"{(h, 2 * h)}: hidden size does not match the target's {h} (another target?)"
        )
    for key, n in (("hidden_size", h), ("vocab_size", vocab)):
        if key in meta and meta[key] != n:
            raise ValueError(f"{cfile}: {key}={meta[key]} but the target has {n}")


def _check_embedding(emb: Tensor, wfile: Path, target: Llama) -> None:
    """A stored embedding must have the target's shape; a different one only warns (unused)."""
    h, vocab = target.config.hidden_size, target.lm_head.weight.shape[0]
    if emb.shape != (vocab, h):
        raise ValueError(
            f"{wfile}: 'embed_tokens.weight' has shape {tuple(emb.shape)}, expected "
            f"{(vocab, h)}: vocabulary does not match the target's {vocab}"
        )
    if not _same_embedding(emb, target.model.embed_tokens.weight):
        log.warning(
            "%s: embed_tokens.weight differs from the target's embedding; using the "
            "target's (EAGLE heads share it)",
            wfile,
        )


def _our_names(state: dict[str, Tensor], wfile: Path) -> dict[str, Tensor]:
    """The head's tensors under DraftHead names; anything but one layer (and d2t) is refused."""
    ours = {}
    for k, v in state.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        if k != "d2t" and not k.startswith(("fc.", "layers.0.")):
            raise ValueError(f"{wfile}: unsupported key {k!r} (only single-layer EAGLE-1/2 heads)")
        ours[_ours(k)] = v
    return ours


def _new_head(
    ours: dict[str, Tensor], meta: dict, wfile: Path, cfile: Path, target: Llama
) -> DraftHead:
    """An untrained head shaped like the file's: its biases, its draft vocabulary."""
    # Published heads differ in optional biases: build the layer with the biases the file has
    # (attention_bias/mlp_bias), then zero any the file lacks (same function as no bias).
    config = copy.deepcopy(target.config)
    if any(k.startswith("layer.self_attn.") and k.endswith(".bias") for k in ours):
        config.attention_bias = True
    if any(k.startswith("layer.mlp.") and k.endswith(".bias") for k in ours):
        config.mlp_bias = True
    d2t = ours.get("d2t")
    if d2t is not None and "draft_vocab_size" in meta and meta["draft_vocab_size"] != len(d2t):
        raise ValueError(
            f"{cfile}: draft_vocab_size={meta['draft_vocab_size']} but d2t has {len(d2t)}"
        )
    try:
        return DraftHead(
            config,
            target.model.embed_tokens.weight,
            target.lm_head.weight,
            bias="fc.bias" in ours,
            d2t=d2t,
        ).to(target.lm_head.weight.dtype)
    except ValueError as e:  # a bad d2t
        raise ValueError(f"{wfile}: 'd2t': {e}") from e


def _complete(ours: dict[str, Tensor], expected: dict[str, Tensor], wfile: Path) -> None:
    """Check `ours` against the head's state dict, adding zeros for the biases it lacks."""
    unexpected = [k for k in ours if k not in expected]
    if unexpected:
        raise ValueError(f"{wfile}: unsupported key {_theirs(unexpected[0])!r}")
    for k, want in expected.items():
        if k not in ours:
            if not k.endswith(".bias"):  # e.g. q/k norms of a Qwen3 target's layer
                raise ValueError(f"{wfile}: missing required key {_theirs(k)!r}")
            log.info("%s: no %r; using zeros", wfile, _theirs(k))
            ours[k] = torch.zeros_like(want)
        elif ours[k].shape != want.shape:
            raise ValueError(
                f"{wfile}: {_theirs(k)!r} has shape {tuple(ours[k].shape)}, expected "
                f"{tuple(want.shape)} for this target"
            )


def load_eagle(path: str | Path, target: Llama) -> tuple[DraftHead, dict]:
    """A head in the EAGLE-1/2 layout, checked against `target`; returns (head, config)."""
    path = Path(path)
    state, wfile = _read_weights(path)
    cfile = path / "config.json"
    meta = json.loads(cfile.read_text()) if cfile.is_file() else {}
    return load_eagle_state(state, meta, wfile, cfile, target)


def load_eagle_state(
    state: dict[str, Tensor], meta: dict, wfile: Path, cfile: Path, target: Llama
) -> tuple[DraftHead, dict]:
    """`load_eagle` on weights already read (an engine's layout may add or unfold tensors)."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    _check_sizes(state, meta, wfile, cfile, target)
    emb = state.pop("embed_tokens.weight", None)
    if emb is not None:
        _check_embedding(emb, wfile, target)
    ours = _our_names(state, wfile)
    head = _new_head(ours, meta, wfile, cfile, target)
    _complete(ours, head.state_dict(), wfile)
    head.load_state_dict(ours)
    meta = {**meta, "source": str(wfile.parent), "format": "eagle", "weights": wfile.name}
    return head.to(target.lm_head.weight.device).eval(), meta
