"""The EAGLE-2 draft head (ALGORITHMS.md section 1). HASS trains this same class.

Input at position t: z_t = fc(concat(E[x_{t+1}], f_t)) -- the token is the one *after* the
feature's position. One Llama decoder layer without its input norm; its output g_t predicts
f_{t+1}, and the target's frozen LM head turns g_t into draft logits.

Optional draft vocabulary (EAGLE-3 / FR-Spec style): with `d2t` (draft index -> target token
id, saved with the weights) the head scores only those rows of the LM head, which is most of
a small head's cost; drafted indices are mapped back to target ids with `to_target`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from taps.models.linear import Linear, linear
from taps.models.llama import DecoderLayer, KVCache, Llama, Rotary, TargetStates

# Bump when the head's architecture or parameter naming changes: it is part of cache keys.
HEAD_VERSION = "eagle-head-v1"


class DraftHead(nn.Module):
    kind = "eagle2"
    aux_layers: tuple[int, ...] = ()  # reads the target's final features only

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

    def input_features(self, states: TargetStates) -> Tensor:
        """What the head takes from the target at committed positions: f, after the final norm."""
        return states.final

    @property
    def bias(self) -> bool:
        return self.fc.bias is not None

    @property
    def target_head_weight(self) -> Tensor:
        """The target's LM-head rows of the draft vocabulary (training targets p); the head
        drafts with these same frozen rows."""
        return self.lm_head_weight

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
    ).to(head.fc.weight.device, head.fc.weight.dtype)  # before loading: no rounding on the way
    full.load_state_dict({k: v for k, v in head.state_dict().items() if k != "d2t"})
    return full.eval()
