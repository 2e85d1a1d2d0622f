"""Target features cached on disk, once per (target, data selection, template, max_len).

One target forward per conversation gives f_t (after the final norm) at every position. We
store input_ids, f (bfloat16 by default) and the assistant loss mask; logits are W f, so they
are recomputed in training rather than stored. For EAGLE-3 drafters the same pass also keeps
the hidden streams entering the auxiliary layers (`aux_layers`), concatenated: [total, k h];
they are stored only for drafters that read them, and their ids enter the cache key. Those
entries also store the target's own full-vocabulary argmax at every position: EAGLE-3's loss
mask needs it every step, and a 49k-way matmul per supervised row per epoch cost more than
computing it once here.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from taps.data.conversations import Conversation, DataError
from taps.data.template import tokenize_conversation
from taps.models.target import DTYPES, Target, in_dtype
from taps.paths import atomic_dir, content_key, file_lock, verify_entry
from taps.training.rowfile import RowFile, RowWriter

log = logging.getLogger(__name__)

FEATURES_VERSION = "features-v1"


@dataclass
class FeatureSet:
    input_ids: torch.Tensor  # [total] int64
    features: torch.Tensor | RowFile  # [total, h]; a RowFile reads rows from disk
    loss_mask: torch.Tensor  # [total] uint8
    offsets: torch.Tensor  # [examples + 1]
    meta: dict
    aux: torch.Tensor | RowFile | None = None  # [total, k h]: EAGLE-3's layers, concatenated
    target_argmax: torch.Tensor | None = None  # [total] int32, argmax(W f): stored with aux

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.features[a:b], self.loss_mask[a:b]

    def inputs(self, i: int) -> torch.Tensor:
        """The head's input features of example i: aux layers if stored, else f."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return (self.features if self.aux is None else self.aux)[a:b]

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])


def features_key(
    target: Target,
    conversations: list[Conversation],
    max_len: int,
    dtype: str,
    compute_dtype: str | None = None,
    aux_layers: tuple[int, ...] = (),
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
        # EAGLE-2 keys unchanged; EAGLE-3 entries also hold the target's argmax
        *([["aux_layers", list(aux_layers)], "target_argmax"] if aux_layers else []),
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


class _Memory:
    """Where computed rows go for an in-memory FeatureSet: preallocated tensors."""

    def __init__(self, total: int, width: int, aux_width: int, dtype: torch.dtype) -> None:
        self.features = torch.empty(total, width, dtype=dtype)
        self.aux = torch.empty(total, aux_width, dtype=dtype) if aux_width else None
        self.top = torch.empty(total, dtype=torch.int32) if aux_width else None

    def write(self, first: int, f: torch.Tensor, aux: torch.Tensor | None,
              top: torch.Tensor | None) -> None:  # fmt: skip
        self.features[first : first + len(f)] = f
        if self.aux is not None:
            self.aux[first : first + len(f)] = aux
            self.top[first : first + len(f)] = top  # type: ignore[index]


class _File:
    """Where computed rows go for a cached FeatureSet: straight into features.safetensors."""

    def __init__(self, writer: RowWriter) -> None:
        self.writer = writer

    def write(self, first: int, f: torch.Tensor, aux: torch.Tensor | None,
              top: torch.Tensor | None) -> None:  # fmt: skip
        self.writer.write("features", first, f)
        if aux is not None:
            self.writer.write("aux", first, aux)
            self.writer.write("target_argmax", first, top)


@dataclass
class _Plan:
    """The tokenized conversations of a feature pass and the layout of its rows."""

    ids: list[list[int]]
    masks: list[list[int]]
    sources: list[str]
    skipped: int

    @property
    def offsets(self) -> torch.Tensor:
        return torch.tensor([0] + [len(s) for s in self.ids]).cumsum(0)

    @property
    def total(self) -> int:
        return sum(map(len, self.ids))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor([t for s in self.ids for t in s], dtype=torch.long),
            "loss_mask": torch.tensor([t for s in self.masks for t in s], dtype=torch.uint8),
            "offsets": self.offsets,
        }


def _plan(target: Target, conversations: list[Conversation], max_len: int) -> _Plan:
    ids, masks, sources = tokenize_all(target, conversations, max_len)
    if not ids:
        raise DataError("no conversation had an assistant turn to supervise (data.components)")
    return _Plan(ids, masks, sources, len(conversations) - len(ids))


@torch.no_grad()
def _run_pass(
    target: Target,
    plan: _Plan,
    sink: _Memory | _File,
    store_dtype: str,
    compute_dtype: str | None,
    aux_layers: tuple[int, ...],
    desc: str,
    batch_tokens: int = 4096,
) -> dict:
    """One target forward per conversation, rows written to `sink`; returns the pass's meta."""
    model = in_dtype(target.model, compute_dtype)
    bar = tqdm(total=plan.total, desc=desc, unit="tok", unit_scale=True)
    t0 = time.perf_counter()
    pad = target.tokenizer.pad_token_id or 0
    _forward_all(model, plan, pad, target.device, DTYPES[store_dtype], batch_tokens, bar,
                 aux_layers, sink)  # fmt: skip
    bar.close()
    secs = time.perf_counter() - t0
    meta = {
        "examples": len(plan.ids),
        "skipped": plan.skipped,
        "tokens": plan.total,
        "supervised_tokens": int(sum(sum(m) for m in plan.masks)),
        "seconds": round(secs, 2),
        "tokens_per_s": round(plan.total / max(secs, 1e-9), 1),
        "store_dtype": store_dtype,
        "compute_dtype": str(next(model.parameters()).dtype),
        "aux_layers": list(aux_layers) or None,
        "by_source": source_stats(plan.ids, plan.masks, plan.sources),
    }
    log.info("%s: %d examples, %d tokens in %.0f s (%.0f tok/s)", desc, len(plan.ids),
             plan.total, secs, meta["tokens_per_s"])  # fmt: skip
    return meta


def token_set(target: Target, conversations: list[Conversation], max_len: int) -> FeatureSet:
    """The tokens and loss masks of a feature set without its features (data.features=online:
    the training batches run the frozen target themselves, `OnlineFeatures`)."""
    plan = _plan(target, conversations, max_len)
    t = plan.tensors()
    meta = {"examples": len(plan.ids), "skipped": plan.skipped, "tokens": plan.total,
            "supervised_tokens": int(t["loss_mask"].sum()), "max_len": max_len, "online": True,
            "by_source": source_stats(plan.ids, plan.masks, plan.sources)}  # fmt: skip
    return FeatureSet(t["input_ids"], None, t["loss_mask"], t["offsets"], meta)  # type: ignore[arg-type]


class OnlineFeatures:
    """Features computed batch by batch from the frozen target during training, instead of a
    cached pass: no disk, and no memory but a copy of the target in `compute_dtype`. Rounded
    to `store_dtype` as cached features are, so both modes train on the same numbers up to the
    batch shapes the matmuls see."""

    def __init__(
        self,
        target: Target,
        aux_layers: tuple[int, ...],
        store_dtype: str = "bfloat16",
        compute_dtype: str | None = None,
    ) -> None:
        self.model = in_dtype(target.model, compute_dtype)
        self.aux_layers, self.dtype = aux_layers, DTYPES[store_dtype]
        self.device = target.device

    @torch.no_grad()
    def __call__(
        self, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """ids [B, n] (right-padded) -> (f [B, n, h], auxiliary layers [B, n, k h] and the
        target's argmax [B, n], both None without auxiliary layers)."""
        states = self.model.states(ids.to(self.device), capture=self.aux_layers)
        f = states.final.to(self.dtype).cpu()
        if not f.isfinite().all():
            raise FloatingPointError("the target computed non-finite features in a training batch")
        top = target_argmax(self.model, states.final).cpu() if self.aux_layers else None
        return f, _concat(states.layers, self.aux_layers, self.dtype), top


def target_argmax(model: torch.nn.Module, final: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """argmax(W f) [...] (int32) of the target's final states [..., h], in row chunks: the
    full [rows, vocab] logits of a 4096-token batch would be the pass's largest tensor."""
    rows = final.reshape(-1, final.shape[-1])
    top = torch.cat([model.logits(c).argmax(-1) for c in rows.split(chunk)])
    return top.to(torch.int32).reshape(final.shape[:-1])


def compute_features(
    target: Target,
    conversations: list[Conversation],
    max_len: int,
    store_dtype: str = "bfloat16",
    batch_tokens: int = 4096,
    desc: str = "features",
    compute_dtype: str | None = None,
    aux_layers: tuple[int, ...] = (),
) -> FeatureSet:
    """Features in memory. `compute_dtype` runs the target forward in another precision
    (bfloat16 is about 2.6x faster than float32 on these CPUs); the stored features are
    rounded to `store_dtype`. `aux_layers`: also keep those layers' hidden streams (EAGLE-3)."""
    plan = _plan(target, conversations, max_len)
    h = target.model.config.hidden_size
    sink = _Memory(plan.total, h, h * len(aux_layers), DTYPES[store_dtype])
    meta = _run_pass(target, plan, sink, store_dtype, compute_dtype, aux_layers, desc,
                     batch_tokens)  # fmt: skip
    t = plan.tensors()
    return FeatureSet(t["input_ids"], sink.features, t["loss_mask"], t["offsets"],
                      {**meta, "max_len": max_len}, sink.aux, sink.top)  # fmt: skip


def _forward_all(
    model: torch.nn.Module,
    plan: _Plan,
    pad: int,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_tokens: int,
    bar: tqdm,
    aux_layers: tuple[int, ...],
    sink: _Memory | _File,
) -> None:
    """The features of every sequence (in `dtype`), and its auxiliary layers concatenated,
    computed in batches of about `batch_tokens` tokens and written to `sink` at its offset."""
    ids, offsets = plan.ids, plan.offsets.tolist()
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
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
        states = model.states(x.to(device), capture=aux_layers)
        f = states.final.to(dtype).cpu()
        a = _concat(states.layers, aux_layers, dtype)
        top = target_argmax(model, states.final).cpu() if aux_layers else None
        for r, j in enumerate(batch):
            n = len(ids[j])
            fr, ar = f[r, :n], None if a is None else a[r, :n]
            if not fr.isfinite().all() or (ar is not None and not ar.isfinite().all()):
                # never cache (or train on) NaN features
                raise FloatingPointError(
                    f"the target computed non-finite features for training sequence {j} "
                    f"({n} tokens): its weights may be damaged, or {dtype} overflows"
                )
            sink.write(offsets[j], fr, ar, None if top is None else top[r, :n])
        bar.update(sum(len(ids[j]) for j in batch))
        i += rows


def _concat(
    layers: dict[int, torch.Tensor], ids: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """The auxiliary layers in the head's order, concatenated on the last axis (CPU, `dtype`)."""
    return torch.cat([layers[i] for i in ids], dim=-1).to(dtype).cpu() if ids else None


def cached_features(
    target: Target,
    conversations: list[Conversation],
    cache_dir: str | Path,
    max_len: int,
    store_dtype: str = "bfloat16",
    desc: str = "features",
    compute_dtype: str | None = None,
    aux_layers: tuple[int, ...] = (),
) -> FeatureSet:
    """The features for exactly these conversations on this target, computed once. Features
    (and auxiliary layers) stay on disk and are read an example at a time (`RowFile`)."""
    key = features_key(target, conversations, max_len, store_dtype, compute_dtype, aux_layers)
    path = Path(cache_dir) / "features" / key
    if not (path / "features.safetensors").is_file():
        with file_lock(Path(cache_dir) / "locks" / f"features-{key}", f"features {desc}"):
            if not (path / "features.safetensors").is_file():
                _compute_and_store(target, conversations, path, key, max_len, store_dtype,
                                   desc, compute_dtype, aux_layers)  # fmt: skip
    verify_entry(path, "cached target features")  # every byte as computed, or an error
    f = path / "features.safetensors"
    names = ("input_ids", "loss_mask", "offsets") + (("target_argmax",) if aux_layers else ())
    small = safe_open_small(f, names)
    meta = json.loads((path / "meta.json").read_text())
    aux = RowFile(f, "aux") if aux_layers else None
    return FeatureSet(small["input_ids"], RowFile(f, "features"), small["loss_mask"],
                      small["offsets"], meta, aux, small.get("target_argmax"))  # fmt: skip


def safe_open_small(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Just these tensors of a safetensors file (the ids and masks, not the features)."""
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


def _compute_and_store(
    target: Target,
    conversations: list[Conversation],
    path: Path,
    key: str,
    max_len: int,
    store_dtype: str,
    desc: str,
    compute_dtype: str | None,
    aux_layers: tuple[int, ...],
) -> None:
    plan = _plan(target, conversations, max_len)
    h, dtype = target.model.config.hidden_size, DTYPES[store_dtype]
    small = plan.tensors()
    specs = {"input_ids": (torch.long, (plan.total,)), "features": (dtype, (plan.total, h))}
    if aux_layers:
        specs["aux"] = (dtype, (plan.total, h * len(aux_layers)))
        specs["target_argmax"] = (torch.int32, (plan.total,))
    specs |= {
        "loss_mask": (torch.uint8, (plan.total,)),
        "offsets": (torch.long, (len(plan.ids) + 1,)),
    }
    with atomic_dir(path) as tmp:
        writer = RowWriter(tmp / "features.safetensors", specs)
        try:
            for name, t in small.items():
                writer.write(name, 0, t)
            meta = _run_pass(target, plan, _File(writer), store_dtype, compute_dtype,
                             aux_layers, desc)  # fmt: skip
        finally:
            writer.close()
        (tmp / "meta.json").write_text(json.dumps({**meta, "max_len": max_len, "key": key},
                                                  indent=2))  # fmt: skip
