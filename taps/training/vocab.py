"""Draft vocabulary: the N target tokens the training responses use most (EAGLE-3's d2t map).

Scoring 8k rows of the LM head instead of 49k is most of a small head's cost on CPU, in
training and in drafting; the price is that tokens outside the set can never be drafted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from taps.training.features import FeatureSet


def frequent_tokens(
    fs: FeatureSet, n: int, vocab_size: int, always: Iterable[int] = ()
) -> tuple[Tensor, float]:
    """(d2t, coverage): the n most frequent response tokens (plus `always`, e.g. EOS ids),
    sorted by id, and the share of response tokens they cover."""
    if n <= 0 or n > vocab_size:
        raise ValueError(f"drafter.draft_vocab={n} must be in 1..{vocab_size}")
    used = torch.bincount(fs.input_ids[fs.loss_mask.bool()], minlength=vocab_size)
    counts = used.double()
    must = sorted({int(i) for i in always if 0 <= int(i) < vocab_size})
    counts[must] = float("inf")  # kept whatever their count
    # Stable tie-break on id so the same data always gives the same map.
    order = torch.argsort(-counts, stable=True)[:n]
    d2t = order.sort().values
    return d2t, float(used[d2t].sum()) / max(float(used.sum()), 1.0)
