"""Draft heads in the layouts serving engines load, and back (`python -m taps.export`).

Written from the loaders themselves (vLLM 0.33 `llama_eagle.py`, `llama_eagle3.py`, its
speculators config; SGLang 0.5.23 `llama_eagle.py`, `llama_eagle3.py`, `load_token_map`;
speculators `Eagle3SpeculatorConfig`), and proven by `make check-serving`, which loads the
vLLM exports in vLLM and compares its acceptance with ours.

EAGLE-1/2 heads (`DraftHead`):
- vllm: `LlamaForCausalLM` config *without* `bias` (vLLM reads it as attention biases), no
  `d2t` (a load error there: the head drafts over the full vocabulary, which vLLM's EAGLE-1/2
  forces), and the fc bias, which vLLM's fc lacks, folded exactly into the head's own
  embedding: fc(cat(E'[x], f)) = W_e E'[x] + W_f f with E' = E + W_e^-1 b.
- sglang: `LlamaForCausalLMEagle`, with `fc.bias` (zeros for a head without one: SGLang's fc
  always has a bias and would keep its random initialisation) and the draft vocabulary as
  `token_map.pt` (absolute target ids, `--speculative-token-map`).
EAGLE-3 heads (`Eagle3Head`):
- vllm: the speculators format (`speculators_model_type: eagle3`), `layers.0.*`, `d2t` as
  offsets (target id = i + d2t[i]) and `t2d`; `norm_before_residual: false` written out
  (vLLM's default for a missing key is true).
- sglang: `LlamaForCausalLMEagle3`, `midlayer.*`, the same `d2t`; its auxiliary layer ids in
  `eagle_config` are one less than ours (SGLang adds one).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from taps.models.draft_head import DraftHead
from taps.models.eagle3_head import Eagle3Head
from taps.models.eagle_format import (
    WEIGHT_FILES,
    _read_weights,
    _replace_dir,
    eagle_config,
    layer_config,
    load_eagle_state,
)
from taps.models.heads import AnyHead, load_head
from taps.models.llama import Llama
from taps.paths import temp_dir_beside

log = logging.getLogger(__name__)

ENGINES = ("vllm", "sglang", "eagle")
EXPORT_VERSION = 2  # the `taps_export` marker; layouts without it came from taps before it
FOLD_TOLERANCE = 1e-4  # relative error of the folded fc bias that still counts as exact


def fold_fc_bias(head: DraftHead) -> Tensor:
    """E' = E + W_e^-1 b, so that W_e E'[x] = W_e E[x] + b (solved in float64). Refused when
    W_e is too ill-conditioned to reproduce b: then train with drafter.bias=false."""
    h = head.fc.weight.shape[0]
    w_e = head.fc.weight[:, :h].detach().double().cpu()
    b = head.fc.bias.detach().double().cpu()
    try:
        shift = torch.linalg.solve(w_e, b)
        err = float((w_e @ shift - b).abs().max() / b.abs().max().clamp(min=1e-30))
    except torch.linalg.LinAlgError:  # singular: no shift reproduces the bias
        err = float("inf")
    if not err < FOLD_TOLERANCE:
        raise ValueError(
            f"cannot fold the fc bias into the embedding exactly (relative error {err:.1e}): "
            "vLLM's EAGLE-1/2 fc has no bias; train the head with drafter.bias=false"
        )
    emb = head.embed_weight.detach().double().cpu()
    return (emb + shift).to(head.embed_weight.dtype)


def _marker(head: AnyHead, engine: str, **extra: Any) -> dict:
    return {
        "taps_export": {"version": EXPORT_VERSION, "engine": engine, "kind": head.kind, **extra}
    }


def _eagle2_state(head: DraftHead) -> dict[str, Tensor]:
    """layers.0.* and fc.weight under EAGLE's names (no fc.bias, no d2t)."""
    out = {}
    for k, v in head.state_dict().items():
        if k in ("d2t", "fc.bias"):
            continue
        out["layers.0." + k.removeprefix("layer.") if k.startswith("layer.") else k] = v
    return out


def eagle2_vllm(head: DraftHead, target_config: Any) -> tuple[dict, dict[str, Tensor], dict]:
    state = _eagle2_state(head)
    folded = head.fc.bias is not None and bool(head.fc.bias.detach().abs().max() > 0)
    if folded:
        state["embed_tokens.weight"] = fold_fc_bias(head)
    if head.d2t is not None:
        log.warning(
            "vLLM's EAGLE-1/2 model has no draft vocabulary: the head drafts over all %d tokens "
            "there (its %d-token d2t is dropped), which reads the whole LM head at every draft "
            "step (about 3x our drafting cost on a CPU). EAGLE-3 heads keep theirs in vLLM.",
            head.lm_head_full.shape[0],
            head.vocab_size,
        )
    cfg = {k: v for k, v in eagle_config(head, target_config).items()
           if k not in ("bias", "eagle_fc_bias", "draft_vocab_size", "taps_head_version")}  # fmt: skip
    cfg |= {"architectures": ["LlamaForCausalLM"], "attention_bias": False}
    cfg |= _marker(head, "vllm", fc_bias="folded into embed_tokens" if folded else None,
                   draft_vocab_dropped=head.vocab_size if head.d2t is not None else None)  # fmt: skip
    return cfg, state, {}


def eagle2_sglang(head: DraftHead, target_config: Any) -> tuple[dict, dict[str, Tensor], dict]:
    state = _eagle2_state(head)
    bias = head.fc.bias
    state["fc.bias"] = torch.zeros(head.fc.weight.shape[0]) if bias is None else bias.detach()
    cfg = {k: v for k, v in eagle_config(head, target_config).items()
           if k not in ("bias", "eagle_fc_bias", "draft_vocab_size", "taps_head_version")}  # fmt: skip
    cfg |= {"architectures": ["LlamaForCausalLMEagle"], "attention_bias": False}
    extra = {}
    if head.d2t is not None:
        extra["token_map.pt"] = head.d2t.detach().cpu().long()
    cfg |= _marker(head, "sglang", token_map="token_map.pt" if extra else None)
    return cfg, state, extra


def _eagle3_state(head: Eagle3Head, layer_prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in head.state_dict().items():
        if k == "d2t":
            continue
        out[layer_prefix + k.removeprefix("layer.") if k.startswith("layer.") else k] = v
    if head.d2t is not None:  # offsets, as SpecForge, speculators, vLLM and SGLang store them
        d2t = head.d2t.detach().cpu().long()
        out["d2t"] = d2t - torch.arange(len(d2t))
        t2d = torch.zeros(head.lm_head_full.shape[0], dtype=torch.bool)
        t2d[d2t] = True
        out["t2d"] = t2d
    return out


def eagle3_vllm(
    head: Eagle3Head, target_config: Any, verifier: str, speculative_tokens: int
) -> tuple[dict, dict[str, Tensor], dict]:
    layer = layer_config(head, target_config)
    cfg = {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "draft_vocab_size": head.vocab_size,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": list(head.aux_layers),
        "embed_requires_grad": False,
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],  # fmt: skip
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "dtype": layer["torch_dtype"],
        **_marker(head, "vllm"),
    }
    return cfg, _eagle3_state(head, "layers.0."), {}


def eagle3_sglang(head: Eagle3Head, target_config: Any) -> tuple[dict, dict[str, Tensor], dict]:
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        **layer_config(head, target_config),
        "draft_vocab_size": head.vocab_size,
        "bias": False,  # SGLang's EAGLE-3 reads `bias` as the fc bias
        # SGLang captures the stream *after* layer id + 1 - 1: its ids are one less than ours.
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [i - 1 for i in head.aux_layers],
            "use_aux_hidden_state": True,
        },  # fmt: skip
        **_marker(head, "sglang", aux_layers_vllm_convention=list(head.aux_layers)),
    }
    return cfg, _eagle3_state(head, "midlayer."), {}


def export_head(
    head: AnyHead,
    target_config: Any,
    out_dir: str | Path,
    engine: str = "vllm",
    verifier: str = "",
    speculative_tokens: int = 3,
) -> Path:
    """Write `head` in the layout `engine` loads (config.json, model.safetensors, and for
    SGLang EAGLE-1/2 heads with a draft vocabulary token_map.pt), atomically."""
    if engine not in ("vllm", "sglang"):
        raise ValueError(f"engine={engine!r}: expected one of {ENGINES}")
    if head.kind == "eagle3":
        cfg, state, extra = (eagle3_vllm(head, target_config, verifier, speculative_tokens)
                             if engine == "vllm" else eagle3_sglang(head, target_config))  # fmt: skip
    else:
        cfg, state, extra = (eagle2_vllm if engine == "vllm" else eagle2_sglang)(
            head, target_config
        )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, tensor in extra.items():
            torch.save(tensor, tmp / name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------- import


def served_kind(cfg: dict, state: dict[str, Tensor]) -> str | None:
    """'eagle3' / 'eagle2' for layouts this module writes or engines load; None otherwise."""
    arch = " ".join(cfg.get("architectures") or [])
    if cfg.get("speculators_model_type") == "eagle3" or "Eagle3" in arch:
        return "eagle3"
    if any(k.startswith(("midlayer.", "layers.0.hidden_norm")) for k in state):
        return "eagle3"
    return None


def load_eagle3(path: Path, cfg: dict, state: dict[str, Tensor], target: Llama) -> Eagle3Head:
    """An EAGLE-3 head in the speculators (vLLM) or SGLang layout, checked against `target`."""
    wfile = path / "model.safetensors"
    ours: dict[str, Tensor] = {}
    for k, v in state.items():
        if k in ("t2d", "embed_tokens.weight"):
            continue  # the target's embedding is used (vLLM and SGLang share it too)
        for prefix in ("midlayer.", "layers.0."):
            if k.startswith(prefix):
                k = "layer." + k.removeprefix(prefix)
        ours[k] = v
    d2t = ours.pop("d2t", None)
    if d2t is not None:
        d2t = d2t.long() + torch.arange(len(d2t))  # offsets -> absolute target ids
    if "eagle_aux_hidden_state_layer_ids" in cfg:
        aux = cfg["eagle_aux_hidden_state_layer_ids"]
    else:  # SGLang's eagle_config ids are one less than ours
        sg = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = None if sg is None else [i + 1 for i in sg]
    head = Eagle3Head.for_target(target, aux, d2t)
    want = head.state_dict()
    missing = [k for k in want if k not in ours and k != "d2t"]
    extra = [k for k in ours if k not in want]
    if missing or extra:
        raise ValueError(f"{wfile}: not an EAGLE-3 head for this target (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")  # fmt: skip
    for k, v in ours.items():
        if v.shape != want[k].shape:
            raise ValueError(f"{wfile}: {k!r} has shape {tuple(v.shape)}, expected "
                             f"{tuple(want[k].shape)} for this target")  # fmt: skip
    head.load_state_dict({**ours, **({"d2t": want["d2t"]} if "d2t" in want else {})})
    return head.to(target.lm_head.weight.device).eval()


def old_export_error(cfg: dict, cfile: Path) -> str | None:
    """A head exported by taps before engine-specific exports existed: its `bias` key makes
    vLLM build attention biases that are never loaded, and its `d2t` is a load error there."""
    if "taps_head_version" in cfg and "taps_export" not in cfg:
        return (
            f"{cfile}: exported by an older taps whose layout vLLM and SGLang misread (its "
            "'bias' key is taken as attention biases, its 'd2t' refused): re-export the "
            "trained drafter with `python -m taps.export ckpt=<drafter dir> engine=vllm` (or "
            "sglang), or use that training directory itself as drafter.path"
        )
    return None


def _load_dir(path: Path, target: Llama) -> tuple[AnyHead, dict]:
    """A directory in any layout we export or engines load, checked against `target`."""
    cfile = path / "config.json"
    try:
        cfg = json.loads(cfile.read_text()) if cfile.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfile}: not valid JSON ({e})") from None
    old = old_export_error(cfg, cfile)
    if old:
        raise ValueError(old)
    state, wfile = _read_weights(path)
    if served_kind(cfg, state) == "eagle3":
        head = load_eagle3(path, cfg, state, target)
        return head, {**cfg, "source": str(path), "format": "eagle3", "weights": wfile.name}
    marker = cfg.get("taps_export") or {}
    if marker.get("fc_bias") == "folded into embed_tokens":  # our vLLM export: unfold it
        h = state["fc.weight"].shape[0]
        shift = (state.pop("embed_tokens.weight").double()
                 - target.model.embed_tokens.weight.double().cpu()).mean(0)  # fmt: skip
        state["fc.bias"] = (state["fc.weight"][:, :h].double() @ shift).to(state["fc.weight"].dtype)
    token_map = path / "token_map.pt"
    if token_map.is_file():  # SGLang's draft vocabulary: absolute target ids
        state["d2t"] = torch.as_tensor(torch.load(token_map, weights_only=True)).long()
    return load_eagle_state(state, cfg, wfile, cfile, target)


def load_pretrained(name: str, target: Llama) -> tuple[AnyHead, dict]:
    """`drafter.path`: a training directory (`save_head`), a local directory in any layout
    `taps.export` writes (EAGLE's, vLLM's, SGLang's; EAGLE-1/2 or EAGLE-3), or a hub id
    (downloaded with huggingface_hub; needs network unless already cached)."""
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "head.safetensors").is_file():
            return load_head(local, target)
        return _load_dir(local, target)
    if local.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"drafter.path={name}: no such directory (nor a hub id org/name)")
    from huggingface_hub import snapshot_download

    try:
        files = ["config.json", *WEIGHT_FILES.values(), "token_map.pt"]
        path = snapshot_download(name, allow_patterns=files)
    except Exception as e:  # offline, unknown repo, gated: the hub raises many types
        raise FileNotFoundError(
            f"drafter.path={name}: could not download from the Hugging Face hub "
            f"({type(e).__name__}: {e}); download it elsewhere and pass the local directory"
        ) from e
    return _load_dir(Path(path), target)
