"""Response regeneration: batched left-padded greedy generation equals one-by-one decoding,
and regenerated conversations are the target's own responses, cached by content."""

from __future__ import annotations

import torch

from taps.data.conversations import Conversation
from taps.data.template import prompt_ids
from taps.engine.decoder import vanilla_generate
from taps.models.llama import KVCache
from taps.models.target import tiny_random
from taps.training import regenerate as regen_mod
from taps.training.regenerate import cached_regeneration, generate_batch


def test_batched_generation_matches_unbatched(cache_dir, monkeypatch):
    target = tiny_random(cache_dir, dtype="float64")
    kept = []  # the batch rows kept at each compaction
    select = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda c, r: kept.append(len(r)) or select(c, r))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    max_new = [9, 4, 12, 6]
    free = vanilla_generate(target.model, prompts[2], 12, set()).tokens
    eos = {free[5]}  # a stop token that prompt 2 meets
    got = generate_batch(target.model, prompts, max_new, eos)
    for p, n, out in zip(prompts, max_new, got, strict=True):
        want = vanilla_generate(target.model, p, n, eos).tokens
        assert out == [t for t in want if t not in eos]
    assert len(got[2]) == free.index(free[5])  # stopped there; the stop token is not kept
    assert kept == [3, 1]  # rows left as they finished: max_new 4; then prompt 2 and max_new 6


def test_regeneration_rewrites_assistant_turns_and_caches(tmp_path, cache_dir, monkeypatch):
    target = tiny_random(cache_dir, dtype="float64")
    convs = [
        Conversation(
            ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}),
            "t", "a",
        ),
        Conversation(
            ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}),
            "t", "b",
        ),
    ]  # fmt: skip
    out = cached_regeneration(target, convs, tmp_path, max_len=256, max_new_tokens=8)
    assert [c.id for c in out] == ["a", "b"]
    a = out[0].messages
    assert [m["role"] for m in a] == ["user", "assistant", "user", "assistant"]
    assert a[0] == convs[0].messages[0] and a[2] == convs[0].messages[2]  # user turns kept
    # Turn 1 is the target's greedy answer to the prompt; turn 2 sees the regenerated turn 1.
    for k in (1, 3):
        ids = prompt_ids(target.tokenizer, a[:k])
        want = vanilla_generate(target.model, ids, 8, target.eos_ids).tokens
        text = target.tokenizer.decode(
            [t for t in want if t not in target.eos_ids], skip_special_tokens=True
        ).strip()
        assert a[k]["content"] == text
    assert out[1].messages[0] == convs[1].messages[0]
    calls = []
    monkeypatch.setattr(regen_mod, "regenerate", lambda *a, **k: calls.append(1) or list(a[1]))
    assert cached_regeneration(target, convs, tmp_path, max_len=256, max_new_tokens=8) == out
    assert not calls  # cache hit
    cached_regeneration(target, convs, tmp_path, max_len=256, max_new_tokens=9)
    assert calls  # another setting is another artefact
