"""Response regeneration (self-distillation): the target rewrites every assistant turn.

A drafter trained on the target's own greedy responses learns the distribution it will be
asked to predict, instead of the dataset authors'. Turns are regenerated in order (turn k sees
the regenerated turns before it), many conversations per batch with left padding and an
explicit KV cache, and the result is cached under a key of the target, the conversations and
the settings.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from taps.data.conversations import Conversation
from taps.data.template import prompt_ids
from taps.models.llama import Llama
from taps.models.target import Target, in_dtype
from taps.paths import content_key, read_verified_text, write_verified_text

log = logging.getLogger(__name__)

# v2: finished rows leave the batch and one-token steps use written-out attention (other
# kernels and shapes: bf16 outputs may differ from v1's).
REGEN_VERSION = "regen-v2"


@torch.no_grad()
def generate_batch(
    model: Llama, prompts: list[list[int]], max_new: list[int], eos: set[int], pad: int = 0
) -> list[list[int]]:
    """Greedy continuations (without the stop token) of several prompts in one batch. Rows
    that finish leave the batch (their cache rows are dropped once a quarter of the batch is
    done), so a long answer no longer makes every finished row pay for its steps."""
    b, width, steps = len(prompts), max(map(len, prompts)), max(max_new)
    dev = model.lm_head.weight.device
    pads = torch.tensor([width - len(p) for p in prompts], device=dev)
    x = torch.full((b, width), pad, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):
        x[r, width - len(p) :] = torch.tensor(p, device=dev)
    slots = torch.arange(width + steps, device=dev)
    real = slots[None, :] >= pads[:, None]  # [b, slots]: left padding is never attended to
    causal = slots[None, :width] <= torch.arange(width, device=dev)[:, None]
    # A padding query sees only itself, so its row is never empty (which would give NaN).
    mask = (causal[None] & real[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=dev)
    cache = model.new_cache(width + steps, b)
    pos = (torch.arange(width, device=dev)[None] - pads[:, None]).clamp(min=0)
    h = model(x, pos, cache, mask[:, None])
    out: list[list[int]] = [[] for _ in range(b)]
    rows = torch.arange(b, device=dev)  # the prompt each live batch row belongs to
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    limit = torch.tensor(max_new, device=dev)
    stop = torch.tensor(sorted(eos), device=dev)
    for step in range(steps):
        tok = model.logits(h[:, -1]).argmax(-1)
        done |= torch.isin(tok, stop)
        owners = rows.tolist()
        for i in (~done).nonzero().flatten().tolist():
            out[owners[i]].append(int(tok[i]))
        done |= torch.tensor([len(out[r]) for r in owners], device=dev) >= limit
        if bool(done.all()):
            break
        if 4 * int(done.sum()) >= len(rows):
            live = (~done).nonzero().flatten()
            cache.select_rows(live)
            rows, tok, pads, real, limit = (t[live] for t in (rows, tok, pads, real, limit))
            done = done[live]
        pos = (width + step - pads)[:, None]
        h = model(tok[:, None], pos, cache, real[:, None, None, : width + step + 1])
    return out


def regenerate(
    target: Target,
    conversations: list[Conversation],
    max_len: int,
    max_new_tokens: int = 384,
    batch_size: int = 32,
    compute_dtype: str | None = "bfloat16",
    desc: str = "regenerate",
) -> list[Conversation]:
    """Every assistant turn rewritten by the target (greedy). Turns whose prompt no longer fits
    in max_len are dropped with everything after them (training would truncate them anyway);
    a conversation left without an assistant turn is dropped."""
    model = in_dtype(target.model, compute_dtype)
    history: list[list[dict]] = [[] for _ in conversations]
    rest = [list(c.messages) for c in conversations]
    active = set(range(len(conversations)))
    bar = tqdm(desc=desc, unit="turn", total=sum(c.n_assistant for c in conversations))
    generated = 0
    t0 = time.perf_counter()
    while active:
        jobs = []  # (conversation, prompt ids) for the next assistant turn of each
        for i in sorted(active):
            while rest[i] and rest[i][0]["role"] != "assistant":
                history[i].append(rest[i].pop(0))
            if not rest[i] or not history[i]:
                active.discard(i)
                continue
            ids = prompt_ids(target.tokenizer, history[i])
            if len(ids) > max_len - 16:
                rest[i] = []
                active.discard(i)
                continue
            jobs.append((i, ids))
        jobs.sort(key=lambda j: len(j[1]))  # similar lengths share a batch: less padding
        for a in range(0, len(jobs), batch_size):
            chunk = jobs[a : a + batch_size]
            new = [min(max_new_tokens, max_len - len(ids)) for _, ids in chunk]
            outs = generate_batch(model, [ids for _, ids in chunk], new, target.eos_ids)
            for (i, _), toks in zip(chunk, outs, strict=True):
                text = target.tokenizer.decode(toks, skip_special_tokens=True).strip()
                history[i].append({"role": "assistant", "content": text})
                rest[i].pop(0)
                generated += len(toks)
            bar.update(len(chunk))
    bar.close()
    secs = time.perf_counter() - t0
    log.info("%s: %d tokens in %.0f s (%.0f tok/s)", desc, generated, secs, generated / secs)
    return [
        Conversation(tuple(h), c.source, c.id)
        for c, h in zip(conversations, history, strict=True)
        if any(m["role"] == "assistant" for m in h)
    ]


def cached_regeneration(
    target: Target,
    conversations: list[Conversation],
    cache_dir: str | Path,
    max_len: int,
    max_new_tokens: int = 384,
    compute_dtype: str | None = "bfloat16",
    desc: str = "regenerate",
) -> list[Conversation]:
    ids = [(c.source, c.id, content_key(list(c.messages), length=8)) for c in conversations]
    key = content_key(REGEN_VERSION, target.key, max_len, max_new_tokens, compute_dtype, ids)
    path = Path(cache_dir) / "regenerated" / f"{key}.jsonl"
    if not path.is_file():
        convs = regenerate(
            target, conversations, max_len, max_new_tokens, compute_dtype=compute_dtype,
            desc=desc,
        )  # fmt: skip
        rows = [json.dumps({"source": c.source, "id": c.id, "messages": c.messages}) for c in convs]
        write_verified_text(path, "".join(r + "\n" for r in rows))
    out = []
    for line in read_verified_text(path, "regenerated conversations").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        out.append(Conversation(tuple(row["messages"]), row["source"], row["id"]))
    return out
