"""EAGLE-3's training objective: training-time test (TTT) over `steps` draft depths.

Step 1 is plain single-step training: the hidden input at position t is g^0_t = fc(aux_t),
the token x_{t+1}. Step k+1 reproduces depth k+1 of drafting: the hidden input at position r
is the head's own step-k output from position r-1 (g^k_{r-1}, the state it would feed back at
inference; not detached, as in the reference), and a query at r attends to real keys at
t <= r-k and to exactly one key of each earlier step j, the one at t = r-k+j: the same
"one key per earlier step" masks as HASS's context alignment (`alignment_mask`), each set at
its own rotary positions. This is the reference's TTT (SafeAILab/EAGLE traineagle3, SpecForge)
written with the tokens fixed and the hidden states shifted, which is the same computation.

Loss per step: cross-entropy of the head's distribution against the target's next-token
distribution restricted to the draft vocabulary and renormalised, at supervised positions whose
target argmax lies in the draft vocabulary (the reference's `position_mask`), normalised by the
number of supervised positions (the reference's `.mean()` over all positions, padding included,
is its known defect 3); steps weighted decay^(k) (reference 0.8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from taps.models.eagle3_head import Eagle3Head
from taps.training.hass import alignment_mask
from taps.training.losses import Rows, supervised


def ttt_forward(head: Eagle3Head, hidden0: Tensor, tokens: Tensor, steps: int) -> list[Tensor]:
    """hidden0 = fc(aux) [B, n, h], tokens [B, n] (x_{t+1}) -> outputs g^1..g^steps, where
    g^{k+1}[r] is what the head computes at draft depth k+1 from position r-k."""
    b, n, _ = hidden0.shape
    pos = torch.arange(n, device=hidden0.device).expand(b, n)
    rope = head.rotary(pos, hidden0.dtype)
    emb = F.embedding(tokens, head.embed_weight).to(hidden0.dtype)
    sets = [hidden0]
    outs: list[Tensor] = []
    for k in range(steps):
        if k == 0:
            g = head.layer(sets[0], emb, rope, None, None)  # plain causal
        else:
            ctx = (
                torch.cat(sets[:k], dim=1),
                torch.cat([emb] * k, dim=1),
                tuple(torch.cat([c] * k, dim=2) for c in rope),
            )
            g = head.layer(sets[k], emb, rope, None, alignment_mask(n, k, hidden0.device), ctx)
        outs.append(g)
        if k + 1 < steps:  # position r's next input: the output at r-1 (position 0 keeps g^0)
            sets.append(torch.cat([hidden0[:, :1], g[:, :-1]], dim=1))
    return outs


def _wide(x: Tensor) -> Tensor:
    """Softmaxes in at least float32 (float64 stays float64, for exactness tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def draft_targets(
    head: Eagle3Head, f_next: Tensor, rows: Rows, top: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(p [R, V_draft], keep [R]) at the rows (`supervised(mask)`): the target's distribution
    over the draft vocabulary (renormalised), and whether the row is real and its
    full-vocabulary argmax is drafted. `top` [B, n]: that argmax as the feature pass stored
    it; None computes it here (a 49k-way matmul per row: a fifth of a TTT-3 step's FLOPs)."""
    with torch.no_grad():
        f = rows.of(f_next).to(head.target_head_weight.dtype)
        p = torch.softmax(_wide(f @ head.target_head_weight.T), dim=-1)
        real = rows.weight > 0
        if head.d2t is None:
            return p, real
        in_vocab = torch.zeros(head.lm_head_full.shape[0], dtype=torch.bool, device=f.device)
        in_vocab[head.d2t] = True
        if top is not None:
            return p, in_vocab[rows.of(top)] & real
        # The full-vocabulary argmax in chunks: [M, 49k] logits at once is the step's largest
        # tensor (hundreds of MB for a batch of long sequences), and only its argmax is needed.
        full = torch.cat([(c @ head.lm_head_full.T).argmax(-1) for c in f.split(256)])
        return p, in_vocab[full] & real


def eagle3_loss(
    head: Eagle3Head,
    aux: Tensor,
    tokens: Tensor,
    f_next: Tensor,
    mask: Tensor,
    steps: int,
    decay: float,
    top: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_k decay^k * CE_k over TTT steps; metrics per step (token loss, top-1 agreement with
    the target's full-vocabulary argmax, out-of-vocabulary positions counting as misses).
    `top` [B, n]: the target's argmax at f_next, if the features hold it (`draft_targets`)."""
    rows = supervised(mask)
    count = rows.count
    p, keep = draft_targets(head, f_next, rows, top)
    want = p.argmax(-1)
    total = torch.zeros((), device=aux.device)
    metrics: dict[str, Tensor] = {}
    for k, g in enumerate(ttt_forward(head, head.fuse(aux), tokens, steps)):
        logq = torch.log_softmax(_wide(head.logits(rows.of(g))), dim=-1)
        ce = -(p * logq).sum(-1)
        loss = (ce * keep).sum() / count
        total = total + decay**k * loss
        with torch.no_grad():
            top1 = ((logq.argmax(-1) == want) & keep).float().sum() / count
        metrics[f"step{k + 1}/token_loss"] = loss.detach()
        metrics[f"step{k + 1}/top1"] = top1
    metrics["loss"] = total.detach()
    metrics["token_loss"] = metrics["step1/token_loss"]
    metrics["top1"] = metrics["step1/top1"]
    return total, metrics
