"""Target features cached on disk, once per (target, data selection, template, max_len).

One target forward per conversation gives f_t (after the final norm) at every position. We
store input_ids, f (bfloat16 by default) and the assistant loss mask; logits are W f, so they
are recomputed in training rather than stored.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from taps.data.conversations import Conversation, DataError
from taps.data.template import tokenize_conversation
from taps.models.target import DTYPES, Target, in_dtype
from taps.paths import atomic_dir, content_key, file_lock, verify_entry

log = logging.getLogger(__name__)

FEATURES_VERSION = "features-v1"


@dataclass
class FeatureSet:
    input_ids: torch.Tensor  # [total] int64
    features: torch.Tensor  # [total, h]
    loss_mask: torch.Tensor  # [total] uint8
    offsets: torch.Tensor  # [examples + 1]
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.features[a:b], self.loss_mask[a:b]

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


def features_key(
    target: Target,
    conversations: list[Conversation],
    max_len: int,
    dtype: str,
    compute_dtype: str | None = None,
) -> str:
    ids = [
        (c.source, c.id, content_key([m["content"] for m in c.messages], length=8))
        for c in conversations
    ]
    return content_key(
        FEATURES_VERSION,
        target.key,
        str(target.model.lm_head.weight.dtype),
        max_len,
        dtype,
        compute_dtype,
        ids,
    )


def tokenize_all(
    target: Target, conversations: list[Conversation], max_len: int
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Token ids and loss masks of the usable conversations, and the source of each one.
    Unusable ones (no assistant turn, nothing supervised after truncation) are skipped with
    one counted warning: they have nothing to train on, but silence would hide a data bug."""
    ids, masks, sources = [], [], []
    why: Counter[str] = Counter()
    first: dict[str, str] = {}  # reason -> first conversation skipped for it
    for c in conversations:
        try:
            t = tokenize_conversation(target.tokenizer, c.messages, max_len=max_len)
        except DataError as e:
            reason = str(e).split(":")[0]
        else:
            if sum(t.loss_mask[1:]) > 0:
                ids.append(t.input_ids)
                masks.append(t.loss_mask)
                sources.append(c.source)
                continue
            reason = "nothing to supervise within max_len"
        why[reason] += 1
        first.setdefault(reason, f"{c.source}/{c.id}")
    if why:
        log.warning(
            "skipped %d of %d conversations: %s",
            sum(why.values()),
            len(conversations),
            "; ".join(f"{r}: {n} (first {first[r]})" for r, n in why.most_common()),
        )
    return ids, masks, sources


def source_stats(ids: list[list[int]], masks: list[list[int]], sources: list[str]) -> dict:
    """Examples, tokens, supervised tokens and token share per source: what training used."""
    by: dict[str, dict] = {}
    for s, i, m in zip(sources, ids, masks, strict=True):
        d = by.setdefault(s, {"examples": 0, "tokens": 0, "supervised_tokens": 0})
        d["examples"] += 1
        d["tokens"] += len(i)
        d["supervised_tokens"] += sum(m)
    sup = max(sum(d["supervised_tokens"] for d in by.values()), 1)
    for d in by.values():
        d["supervised_share"] = round(d["supervised_tokens"] / sup, 4)
    return by


@torch.no_grad()
def compute_features(
    target: Target,
    conversations: list[Conversation],
    max_len: int,
    store_dtype: str = "bfloat16",
    batch_tokens: int = 4096,
    desc: str = "features",
    compute_dtype: str | None = None,
) -> FeatureSet:
    """`compute_dtype` runs the target forward in another precision (bfloat16 is about 2.6x
    faster than float32 on these CPUs); the stored features are rounded to `store_dtype`."""
    ids, masks, sources = tokenize_all(target, conversations, max_len)
    skipped = len(conversations) - len(ids)
    if not ids:
        raise DataError("no conversation had an assistant turn to supervise (data.components)")
    model = in_dtype(target.model, compute_dtype)
    total = sum(map(len, ids))
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True)
    t0 = time.perf_counter()
    pad = target.tokenizer.pad_token_id or 0
    out = _forward_all(model, ids, pad, target.device, DTYPES[store_dtype], batch_tokens, bar)
    bar.close()
    secs = time.perf_counter() - t0
    lengths = torch.tensor([0] + [len(s) for s in ids])
    meta = {
        "examples": len(ids),
        "skipped": skipped,
        "tokens": total,
        "supervised_tokens": int(sum(sum(m) for m in masks)),
        "seconds": round(secs, 2),
        "tokens_per_s": round(total / max(secs, 1e-9), 1),
        "store_dtype": store_dtype,
        "compute_dtype": str(next(model.parameters()).dtype),
        "max_len": max_len,
        "by_source": source_stats(ids, masks, sources),
    }
    log.info(
        "%s: %d examples, %d tokens in %.0f s (%.0f tok/s)",
        desc,
        len(ids),
        total,
        secs,
        meta["tokens_per_s"],
    )
    return FeatureSet(
        input_ids=torch.tensor([t for s in ids for t in s], dtype=torch.long),
        features=torch.cat(out),
        loss_mask=torch.tensor([t for s in masks for t in s], dtype=torch.uint8),
        offsets=lengths.cumsum(0),
        meta=meta,
    )


def _forward_all(
    model: torch.nn.Module,
    ids: list[list[int]],
    pad: int,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_tokens: int,
    bar: tqdm,
) -> list[torch.Tensor]:
    """The features of every sequence of `ids` (in `dtype`, on the CPU), computed in batches
    of about `batch_tokens` tokens."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    i = 0
    while i < len(order):
        # Length-sorted batches, right-padded: causal attention never lets a real position
        # see the padding after it, so padded features equal unpadded ones.
        width = len(ids[order[i]])
        rows = max(1, batch_tokens // width)
        batch = order[i : i + rows]
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, j in enumerate(batch):
            x[r, : len(ids[j])] = torch.tensor(ids[j])
        f = model(x.to(device)).to(dtype).cpu()
        for r, j in enumerate(batch):
            out[j] = f[r, : len(ids[j])]
            if not torch.isfinite(out[j]).all():  # never cache (or train on) NaN features
                raise FloatingPointError(
                    f"the target computed non-finite features for training sequence {j} "
                    f"({len(ids[j])} tokens): its weights may be damaged, or {dtype} overflows"
                )
        bar.update(sum(len(ids[j]) for j in batch))
        i += rows
    return out  # type: ignore[return-value]


def cached_features(
    target: Target,
    conversations: list[Conversation],
    cache_dir: str | Path,
    max_len: int,
    store_dtype: str = "bfloat16",
    desc: str = "features",
    compute_dtype: str | None = None,
) -> FeatureSet:
    """Load the features for exactly these conversations on this target, computing them once."""
    key = features_key(target, conversations, max_len, store_dtype, compute_dtype)
    path = Path(cache_dir) / "features" / key
    if not (path / "features.safetensors").is_file():
        with file_lock(Path(cache_dir) / "locks" / f"features-{key}", f"features {desc}"):
            if not (path / "features.safetensors").is_file():
                _compute_and_store(target, conversations, path, key, max_len, store_dtype,
                                   desc, compute_dtype)  # fmt: skip
    verify_entry(path, "cached target features")  # every byte as computed, or an error
    t = load_file(str(path / "features.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    return FeatureSet(t["input_ids"], t["features"], t["loss_mask"], t["offsets"], meta)


def _compute_and_store(
    target: Target,
    conversations: list[Conversation],
    path: Path,
    key: str,
    max_len: int,
    store_dtype: str,
    desc: str,
    compute_dtype: str | None,
) -> None:
    fs = compute_features(
        target, conversations, max_len, store_dtype, desc=desc, compute_dtype=compute_dtype
    )
    with atomic_dir(path) as tmp:
        save_file(
            {
                "input_ids": fs.input_ids,
                "features": fs.features.contiguous(),
                "loss_mask": fs.loss_mask,
                "offsets": fs.offsets,
            },
            str(tmp / "features.safetensors"),
        )
        (tmp / "meta.json").write_text(json.dumps({**fs.meta, "key": key}, indent=2))
