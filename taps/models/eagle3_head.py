"""The EAGLE-3 draft head (ALGORITHMS.md section 9; layout as in SafeAILab/EAGLE traineagle3,
SpecForge and vLLM's llama_eagle3.py).

- Feature fusion: the target's hidden streams entering layers `aux_layers` (default 2, L/2,
  L-3, vLLM's convention: id k = the state after k layers, before any norm) are concatenated
  and mapped by `fc` (3h -> h, no bias) to the hidden input g.
- One decoder layer whose attention reads concat(input_layernorm(E[x_{t+1}]), hidden_norm(g))
  (2h wide) and whose residual stream is g itself (`norm_before_residual: false`).
- The layer's pre-norm output is what the head feeds back as g at the next draft depth (no
  `fc` again); logits are its own `lm_head(norm(output))` over the draft vocabulary (`d2t`:
  draft index -> target id, stored here as absolute ids; exports write vLLM's offsets).

The embedding is the target's, frozen. The final norm and LM head are trained; they start from
the target's own final norm and LM-head rows (the reference starts them at random; with the
small data budgets of a CPU this start converges much faster, and `init_head=random` keeps the
reference's behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taps.models.linear import Linear
from taps.models.llama import MLP, Attention, KVCache, Llama, RMSNorm, Rotary, TargetStates

HEAD_VERSION = "eagle3-head-v1"


def default_aux_layers(n_layers: int) -> tuple[int, int, int]:
    """The reference's low, middle and high layers: 2, L/2 and L-3 (vLLM, EAGLE)."""
    return (min(2, n_layers), n_layers // 2, max(n_layers - 3, 0))


class Eagle3Layer(nn.Module):
    """A Llama block whose attention input is concat(norm(embedding), norm(hidden)), 2h wide."""

    def __init__(self, config) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)  # on the token embedding
        self.hidden_norm = RMSNorm(h, eps)  # on the hidden input g
        self.self_attn = Attention(config, layer_idx=0, in_features=2 * h)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(config)

    def attn_input(self, hidden: Tensor, emb: Tensor) -> Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)

    def forward(
        self,
        hidden: Tensor,
        emb: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        mask: Tensor | None,
        context: tuple[Tensor, Tensor, tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """`context` = (hidden, embeddings, rope) of extra key positions before the block's own
        (training-time test attends to earlier steps' predictions this way)."""
        ctx = None
        if context is not None:
            ctx = (self.attn_input(context[0], context[1]), context[2])
        x = hidden + self.self_attn(self.attn_input(hidden, emb), rope, cache, mask, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Head(nn.Module):
    kind = "eagle3"

    def __init__(
        self,
        config,
        embed: Tensor,
        lm_head: Tensor,
        aux_layers: Sequence[int],
        d2t: Tensor | None = None,
        final_norm: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.aux_layers = tuple(int(i) for i in aux_layers)
        if len(self.aux_layers) < 1 or len(set(self.aux_layers)) != len(self.aux_layers):
            raise ValueError(f"drafter.aux_layers={list(aux_layers)}: need distinct layer ids")
        self.fc = Linear(len(self.aux_layers) * h, h, bias=False)
        self.layer = Eagle3Layer(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.rotary = Rotary(config)
        self.register_buffer("embed_weight", embed.detach(), persistent=False)
        self.register_buffer("lm_head_full", lm_head.detach(), persistent=False)
        if d2t is None:
            self.d2t = None
            rows = lm_head.detach()
        else:
            d2t = d2t.to(device=lm_head.device, dtype=torch.long)
            if d2t.ndim != 1 or d2t.numel() == 0 or int(d2t.max()) >= lm_head.shape[0]:
                raise ValueError(f"d2t must be 1-D target ids < {lm_head.shape[0]}")
            self.register_buffer("d2t", d2t)
            rows = lm_head.detach()[d2t]
        # The target's LM-head rows of the draft vocabulary: the training targets p.
        self.register_buffer("target_head_weight", rows, persistent=False)
        self.lm_head = Linear(h, rows.shape[0], bias=False)
        with torch.no_grad():  # start from the target's head (see the module docstring)
            self.lm_head.weight.copy_(rows)
            if final_norm is not None:
                self.norm.weight.copy_(final_norm.detach())

    @classmethod
    def for_target(
        cls, target: Llama, aux_layers: Sequence[int] | None = None, d2t: Tensor | None = None
    ) -> Eagle3Head:
        n = target.config.num_hidden_layers
        aux = default_aux_layers(n) if aux_layers is None else tuple(aux_layers)
        bad = [i for i in aux if not 0 <= int(i) <= n]
        if bad:
            raise ValueError(f"drafter.aux_layers={list(aux)}: ids {bad} outside 0..{n}")
        head = cls(
            target.config,
            target.model.embed_tokens.weight,
            target.lm_head.weight,
            aux,
            d2t,
            target.model.norm.weight,
        )
        return head.to(target.lm_head.weight.dtype)

    def reset_lm_head(self, seed: int) -> None:
        """The reference's start: a randomly initialised LM head and a unit final norm."""
        gen = torch.Generator().manual_seed(seed)
        w = self.lm_head.weight
        bound = 1 / w.shape[1] ** 0.5
        with torch.no_grad():
            w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=gen))
            self.norm.weight.fill_(1.0)

    @property
    def bias(self) -> bool:
        return False

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        attn = self.layer.self_attn
        w = self.fc.weight
        return KVCache(1, attn.n_kv, attn.head_dim, max_len, w.dtype, w.device, batch)

    def fuse(self, aux: Tensor) -> Tensor:
        """Concatenated auxiliary states [..., k h] -> the hidden input g [..., h]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def input_features(self, states: TargetStates) -> Tensor:
        """What the head takes from the target at committed positions: fc of its layers."""
        missing = [i for i in self.aux_layers if i not in states.layers]
        if missing:
            raise ValueError(f"the target's states lack auxiliary layers {missing}")
        return self.fuse(torch.cat([states.layers[i] for i in self.aux_layers], dim=-1))

    def forward(
        self,
        hidden: Tensor,
        next_tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """hidden [B, n, h] (fc output, or the head's own output one depth up), next_tokens
        [B, n] (x_{t+1}) -> the layer's pre-norm output [B, n, h], fed back at the next depth."""
        b, n = next_tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + n, device=next_tokens.device).expand(b, n)
        emb = F.embedding(next_tokens, self.embed_weight).to(hidden.dtype)
        out = self.layer(hidden, emb, self.rotary(positions, hidden.dtype), cache, mask)
        if cache is not None:
            cache.advance(n)
        return out

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def logits(self, g: Tensor) -> Tensor:
        return self.lm_head(self.norm(g))

    def to_target(self, ids: Tensor) -> Tensor:
        return ids if self.d2t is None else self.d2t[ids]
