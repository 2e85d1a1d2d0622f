"""A lean Llama (and Qwen2/Qwen3) that loads Hugging Face weights, with an explicit preallocated KV cache.

Speculative decoding needs three things transformers' generic model makes awkward: arbitrary
(tree) attention masks over a cache, depth-based position ids, and in-place compaction of the
cache after acceptance. Writing the forward pass here (gpt-fast style) keeps all of that in
plain sight. Parameter names match `LlamaForCausalLM`, so its state dict loads unchanged;
`tests/test_llama.py` pins the logits against transformers.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taps.models.linear import Linear

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class KVCache:
    """Keys and values of every layer in one preallocated buffer.

    `length` is the number of committed positions. A forward writes its n new positions at
    [length, length + n) and advances `length`; the decoder then keeps what was accepted
    (`keep`) or drops the rest (`truncate`). No re-allocation per step.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store n new positions for `layer` after the committed ones; return all keys/values."""
        start, n = self.length, k.shape[2]
        if start + n > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {start} + {n} > max_len {self.max_len}; "
                "raise max_new_tokens headroom or shorten the prompt"
            )
        self.k[layer, :, :, start : start + n] = k
        self.v[layer, :, :, start : start + n] = v
        return self.k[layer, :, :, : start + n], self.v[layer, :, :, : start + n]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        self.length = length

    def keep(self, start: int, offsets: Tensor) -> None:
        """Compact: positions start+offsets[i] move to start+i; everything after is dropped."""
        idx = start + offsets.to(self.k.device)
        n = offsets.numel()
        self.k[:, :, :, start : start + n] = self.k[:, :, :, idx]
        self.v[:, :, :, start : start + n] = self.v[:, :, :, idx]
        self.length = start + n

    def select_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (a batch whose finished rows stop costing compute)."""
        self.k = self.k[:, rows.to(self.k.device)]
        self.v = self.v[:, rows.to(self.v.device)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least float32 as transformers does (float64 stays float64 for tests).
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: PreTrainedConfig) -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling for the config's rope type."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
        )
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # llama3, yarn, ...

    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv.float(), float(scale)


class Rotary(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inv, self.scale = rope_inv_freq(config)
        # A plain attribute, not a buffer: a module-wide .to(bfloat16) must not round it.
        self.inv_freq = inv.double()

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, n] -> cos, sin [B, 1, n, head_dim] (broadcast over heads)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        freqs = positions[..., None].to(wide) * self.inv_freq.to(wide)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, in_features: int | None = None) -> None:
        """`in_features`: width of the attention input when it is not the hidden size (EAGLE-3's
        layer attends over concat(embedding, hidden), 2h wide)."""
        super().__init__()
        h = config.hidden_size
        d_in = in_features or h
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.n_heads
        self.layer_idx = layer_idx
        # The Qwen adapter: Qwen2 has q/k/v biases (no o bias), Qwen3 RMS-norms q and k per head.
        family = getattr(config, "model_type", "llama")
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias or family == "qwen2"
        self.q_proj = Linear(d_in, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(d_in, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(d_in, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=bias and family != "qwen2")
        self.qk_norm = family == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _kv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            k = self.k_norm(k)
        cos, sin = rope
        return k * cos + _rotate_half(k) * sin, v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        mask: Tensor | None,
        context: tuple[Tensor, tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """`context` = (inputs, rope) of extra key/value positions placed before x's own (HASS
        training attends to earlier rounds' predictions this way); the mask covers both."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q = self.q_norm(q)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k, v = self._kv(x, rope)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        if context is not None:
            ck, cv = self._kv(*context)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        # Causal over the new block when no explicit mask is given and nothing precedes it.
        causal = mask is None and k.shape[2] == n and n > 1
        if mask is None and not causal and n > 1:
            mask = causal_mask(n, k.shape[2], x.device)
        if n == 1 and b > 1:  # batched one-token decoding (regeneration)
            out = one_query_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of one query per row, written out: for a batch of one-token decoding steps
    torch's CPU SDPA kernel takes 2.7 ms a layer where this takes 0.45 (batch 32, 200 keys,
    bf16). q [b, H, 1, D]; k, v [b, KV, T, D] with H a multiple of KV; mask bool, broadcast to
    [b, H, 1, T]."""
    b, h, _, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    s = (q.view(b, kv, h // kv, d) @ k.transpose(-1, -2)) * d**-0.5
    s = s.to(torch.promote_types(s.dtype, torch.float32))  # softmax in at least float32
    if mask is not None:
        s = s.masked_fill(~mask.expand(b, h, 1, t).reshape(b, kv, h // kv, t), float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v).view(b, h, 1, d)


def causal_mask(n: int, total: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool [n, total]: query i (at absolute slot total-n+i) sees every slot up to itself."""
    q = torch.arange(total - n, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= q


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h, m = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = Linear(h, m, bias=bias)
        self.up_proj = Linear(h, m, bias=bias)
        self.down_proj = Linear(m, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One Llama block. `input_norm=False` gives the EAGLE head's variant (inputs already normed)."""

    def __init__(self, config, layer_idx: int, input_norm: bool = True) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps) if input_norm else nn.Identity()
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        mask: Tensor | None,
        context: tuple[Tensor, tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        if context is not None:
            context = (self.input_layernorm(context[0]), context[1])
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask, context)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class TargetStates:
    """The target's hidden states that drafters read: `final` after the final norm (f, what
    EAGLE-1/2 heads take and the LM head multiplies) and `layers` {i: the hidden stream
    entering decoder layer i, before any norm} (EAGLE-3's auxiliary states; i = number of
    layers is the last layer's output). Indexing selects positions of every tensor."""

    final: Tensor
    layers: dict[int, Tensor] = field(default_factory=dict)

    def __getitem__(self, index: object) -> TargetStates:
        return TargetStates(self.final[index], {i: t[index] for i, t in self.layers.items()})

    @staticmethod
    def cat(parts: list[TargetStates]) -> TargetStates:
        """The positions of several parts, in order (a drafter catching up on several cycles)."""
        if len(parts) == 1:
            return parts[0]
        layers = {i: torch.cat([p.layers[i] for p in parts]) for i in parts[0].layers}
        return TargetStates(torch.cat([p.final for p in parts]), layers)


class Llama(nn.Module):
    """Decoder-only Llama; `forward` returns final-normed hidden states (the features f)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(config)

    @property
    def head_dim(self) -> int:
        return self.model.layers[0].self_attn.head_dim

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        p = self.lm_head.weight
        return KVCache(
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.head_dim,
            max_len,
            p.dtype,
            p.device,
            batch,
        )

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, n]; positions [B, n] (default: after the cache); mask bool [n, ctx]
        (True = may attend) over cache slots then the new ones. Advances the cache by n."""
        return self.states(input_ids, positions, cache, mask).final

    def states(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
        capture: Collection[int] = (),
    ) -> TargetStates:
        """`forward`, also keeping the hidden stream entering each layer id in `capture` (vLLM's
        convention for EAGLE-3's auxiliary layers: id k = the state after k layers)."""
        b, n = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + n, device=input_ids.device).expand(b, n)
        n_layers = len(self.model.layers)
        bad = [i for i in capture if not 0 <= i <= n_layers]
        if bad:
            raise ValueError(
                f"auxiliary layer ids {bad} outside 0..{n_layers} (the target's layers)"
            )
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        kept: dict[int, Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if i in capture:
                kept[i] = x
            x = layer(x, rope, cache, mask)
        if n_layers in capture:
            kept[n_layers] = x
        if cache is not None:
            cache.advance(n)
        return TargetStates(self.model.norm(x), kept)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)
