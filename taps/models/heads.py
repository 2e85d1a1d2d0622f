"""Draft-head kinds, registered in one place: building, saving and loading any of them.

- `eagle2`: `DraftHead` (EAGLE-1/2 and HASS; taps/models/draft_head.py).
- `eagle3`: `Eagle3Head` (taps/models/eagle3_head.py).

A saved head is `head.safetensors` (the trained weights, plus `d2t`) and `config.json`, whose
`kind` says which class reads it (absent: `eagle2`, as every head saved before EAGLE-3).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from taps.models import draft_head, eagle3_head
from taps.models.draft_head import DraftHead
from taps.models.eagle3_head import Eagle3Head
from taps.models.llama import Llama

log = logging.getLogger(__name__)

AnyHead = DraftHead | Eagle3Head
KINDS: dict[str, type] = {"eagle2": DraftHead, "eagle3": Eagle3Head}
# Part of cache keys: bump a kind's version when its architecture or parameter names change.
VERSIONS = {"eagle2": draft_head.HEAD_VERSION, "eagle3": eagle3_head.HEAD_VERSION}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"drafter.kind={kind!r}: expected one of {sorted(KINDS)}")
    return kind


def build_head(
    kind: str,
    target: Llama,
    bias: bool = True,
    aux_layers: Sequence[int] | None = None,
    d2t: Tensor | None = None,
) -> AnyHead:
    """An untrained head of `kind` for `target` (bias: EAGLE-2's fc bias; aux_layers: EAGLE-3's
    fused target layers, None = the reference's 2, L/2, L-3)."""
    if check_kind(kind) == "eagle3":
        if bias:
            raise ValueError("drafter.bias=true: an EAGLE-3 head's fc has no bias (set it false)")
        return Eagle3Head.for_target(target, aux_layers, d2t)
    if aux_layers:
        raise ValueError(f"drafter.aux_layers={list(aux_layers)}: only EAGLE-3 heads fuse layers")
    return DraftHead.for_target(target, bias=bias, d2t=d2t)


def save_head(head: AnyHead, directory: str | Path, meta: dict) -> None:
    """Weights as safetensors and a JSON config recording target, data and training settings."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(directory / "head.safetensors"))
    meta = {
        **meta,
        "kind": head.kind,
        "head_version": VERSIONS[head.kind],
        "bias": head.bias,
        "aux_layers": list(head.aux_layers) or None,
        "draft_vocab": head.vocab_size if head.d2t is not None else None,
        # The target's LM head is not saved: record its size to catch a mismatch.
        "target_vocab": head.lm_head_full.shape[0],
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2, default=str))


def _read(directory: Path) -> tuple[dict, dict[str, Tensor], Path]:
    cfg_file, weights = directory / "config.json", directory / "head.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ValueError(f"{f}: missing (not a drafter saved by taps?)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:  # garbage or truncated bytes
        raise ValueError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    if "fc.weight" not in state:
        raise ValueError(f"{weights}: no 'fc.weight' (not a taps draft head)")
    return meta, state, weights


def _check_target(directory: Path, meta: dict, state: dict[str, Tensor], target: Llama) -> None:
    """Hidden size and vocabulary must be the target's (a head for another target fails)."""
    h = target.config.hidden_size
    kind = meta.get("kind", "eagle2")
    width = 2 * h if kind == "eagle2" else len(meta.get("aux_layers") or [0, 0, 0]) * h
    if state["fc.weight"].shape != (h, width):
        raise ValueError(
            f"{directory}: head hidden size {state['fc.weight'].shape[0]} does not match the "
            f"target's {h} (checkpoint for another target? fc input "
            f"{state['fc.weight'].shape[1]}, expected {width})"
        )
    vocab = target.lm_head.weight.shape[0]
    saved_vocab = meta.get("target_vocab")  # absent in heads saved before it was recorded
    d2t = state.get("d2t")
    if (saved_vocab is not None and saved_vocab != vocab) or (
        d2t is not None and d2t.numel() and int(d2t.max()) >= vocab
    ):
        got = saved_vocab if saved_vocab is not None else f"> {int(d2t.max())}"  # type: ignore[union-attr]
        raise ValueError(
            f"{directory}: head was trained for a vocabulary of {got} tokens, the target has "
            f"{vocab} (checkpoint for another target?)"
        )


def _warn_other_weights(directory: Path, meta: dict, target: Llama, key: str | None) -> None:
    saved = meta.get("target") if isinstance(meta.get("target"), dict) else {}
    key = key or getattr(target, "target_key", None)  # set by models.target.Target
    if key is not None and saved.get("key") is not None and saved["key"] != key:
        log.warning(
            "%s was trained on target %s (key %s), not this one (key %s): acceptance may be poor",
            directory,
            saved.get("name"),
            saved["key"],
            key,
        )


def load_head(
    directory: str | Path, target: Llama, target_key: str | None = None
) -> tuple[AnyHead, dict]:
    """Load a head saved by `save_head` onto `target`. A checkpoint for another target (hidden
    size or vocabulary) or an unreadable file is a ValueError naming the file; a different
    `target_key` (same shapes, other weights) only warns, as the head may still draft well."""
    directory = Path(directory)
    meta, state, weights = _read(directory)
    try:
        kind = check_kind(meta.get("kind", "eagle2"))
    except ValueError as e:
        raise ValueError(f"{directory / 'config.json'}: {e}") from None
    _check_target(directory, meta, state, target)
    _warn_other_weights(directory, meta, target, target_key)
    head = build_head(
        kind, target, bool(meta.get("bias", kind == "eagle2")), meta.get("aux_layers"),
        state.get("d2t"),
    )  # fmt: skip
    try:
        head.load_state_dict(state)
    except RuntimeError as e:  # a key or shape that this kind does not have
        raise ValueError(f"{weights}: does not fit a {kind} head ({e})") from None
    return head.to(target.lm_head.weight.device).eval(), meta
