"""The EAGLE-2 draft head (ALGORITHMS.md section 1). HASS trains this same class.

Input at position t: z_t = fc(concat(E[x_{t+1}], f_t)) -- the token is the one *after* the
feature's position. One Llama decoder layer without its input norm; its output g_t predicts
f_{t+1}, and the target's frozen LM head turns g_t into draft logits.

Optional draft vocabulary (EAGLE-3 / FR-Spec style): with `d2t` (draft index -> target token
id, saved with the weights) the head scores only those rows of the LM head, which is most of
a small head's cost; drafted indices are mapped back to target ids with `to_target`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from taps.models.linear import Linear, linear
from taps.models.llama import DecoderLayer, KVCache, Llama, Rotary

log = logging.getLogger(__name__)

# Bump when the head's architecture or parameter naming changes: it is part of cache keys.
HEAD_VERSION = "eagle-head-v1"


class DraftHead(nn.Module):
    def __init__(
        self,
        config,
        embed: Tensor,
        lm_head: Tensor,
        bias: bool = True,
        d2t: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = Linear(2 * h, h, bias=bias)
        self.layer = DecoderLayer(config, layer_idx=0, input_norm=False)
        self.rotary = Rotary(config)
        # Shared with the target and frozen: buffers move with the module but are not saved.
        self.register_buffer("embed_weight", embed.detach(), persistent=False)
        # The full head stays for metrics against the target's own argmax.
        self.register_buffer("lm_head_full", lm_head.detach(), persistent=False)
        if d2t is None:
            self.d2t = None
            self.register_buffer("lm_head_weight", lm_head.detach(), persistent=False)
        else:
            d2t = d2t.to(device=lm_head.device, dtype=torch.long)
            if d2t.ndim != 1 or d2t.numel() == 0 or int(d2t.max()) >= lm_head.shape[0]:
                raise ValueError(f"d2t must be 1-D target ids < {lm_head.shape[0]}")
            self.register_buffer("d2t", d2t)
            self.register_buffer("lm_head_weight", lm_head.detach()[d2t], persistent=False)

    @classmethod
    def for_target(cls, target: Llama, bias: bool = True, d2t: Tensor | None = None) -> DraftHead:
        head = cls(
            target.config,
            target.model.embed_tokens.weight,
            target.lm_head.weight,
            bias=bias,
            d2t=d2t,
        )
        return head.to(target.lm_head.weight.dtype)

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        attn = self.layer.self_attn
        w = self.fc.weight
        return KVCache(1, attn.n_kv, attn.head_dim, max_len, w.dtype, w.device, batch)

    def forward(
        self,
        features: Tensor,
        next_tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """features [B, n, h] (f_t), next_tokens [B, n] (x_{t+1}) -> g [B, n, h]."""
        b, n = next_tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + n, device=next_tokens.device).expand(b, n)
        emb = nn.functional.embedding(next_tokens, self.embed_weight)
        x = self.fc(torch.cat([emb, features.to(emb.dtype)], dim=-1))
        out = self.layer(x, self.rotary(positions, x.dtype), cache, mask)
        if cache is not None:
            cache.advance(n)
        return out

    @property
    def vocab_size(self) -> int:
        return self.lm_head_weight.shape[0]

    def logits(self, g: Tensor) -> Tensor:
        """Draft logits over the draft vocabulary (the full one unless d2t is set)."""
        return linear(g, self.lm_head_weight)

    def to_target(self, ids: Tensor) -> Tensor:
        """Draft-vocabulary indices -> target token ids."""
        return ids if self.d2t is None else self.d2t[ids]


def with_full_vocab(head: DraftHead) -> DraftHead:
    """The same trained head drafting over the target's whole vocabulary (its d2t dropped):
    what the draft vocabulary saves at inference, measured with identical weights."""
    full = DraftHead(
        head.config, head.embed_weight, head.lm_head_full, bias=head.fc.bias is not None
    )
    full.load_state_dict({k: v for k, v in head.state_dict().items() if k != "d2t"})
    return full.to(head.fc.weight.device, head.fc.weight.dtype).eval()


def save_head(head: DraftHead, directory: str | Path, meta: dict) -> None:
    """Weights as safetensors and a JSON config recording target, data and training settings."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(directory / "head.safetensors"))
    meta = {
        **meta,
        "head_version": HEAD_VERSION,
        "bias": head.fc.bias is not None,
        "draft_vocab": head.vocab_size if head.d2t is not None else None,
        # The LM head is the target's and is not saved: record its size to catch a mismatch.
        "target_vocab": head.lm_head_full.shape[0],
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2, default=str))


def load_head(
    directory: str | Path, target: Llama, target_key: str | None = None
) -> tuple[DraftHead, dict]:
    """Load a head saved by `save_head` onto `target`. A checkpoint for another target (hidden
    size or vocabulary) or an unreadable file is a ValueError naming the file; a different
    `target_key` (same shapes, other weights) only warns, as the head may still draft well."""
    directory = Path(directory)
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
    h = target.config.hidden_size
    if state["fc.weight"].shape != (h, 2 * h):
        raise ValueError(
            f"{directory}: head hidden size {state['fc.weight'].shape[0]} does not match "
            f"the target's {h} (checkpoint for another target?)"
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
    saved = meta.get("target") if isinstance(meta.get("target"), dict) else {}
    target_key = target_key or getattr(target, "target_key", None)  # set by models.target.Target
    saved_key = saved.get("key")
    if target_key is not None and saved_key is not None and saved_key != target_key:
        log.warning(
            "%s was trained on target %s (key %s), not this one (key %s): acceptance may be poor",
            directory,
            saved.get("name"),
            saved_key,
            target_key,
        )
    head = DraftHead.for_target(target, bias=bool(meta.get("bias", True)), d2t=d2t)
    head.load_state_dict(state)
    return head.to(target.lm_head.weight.device).eval(), meta
