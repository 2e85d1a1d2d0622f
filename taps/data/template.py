"""Render conversations with the target's own chat template and derive the loss mask from it.

The mask comes from rendering prefix by prefix, never from hard-coded offsets (the reference
code's offsets broke across tokenizer versions): for assistant message i,
P = render(messages[:i], add_generation_prompt=True) and Q = render(messages[:i + 1]); the tokens
Q[len(P):] are what the assistant generates, up to and including its end-of-turn (eos) token."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taps.data.conversations import ROLES, DataError

log = logging.getLogger(__name__)
_warned_no_eos = False


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the assistant generates (content + end-of-turn), else 0


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], max_len: int | None = None
) -> Tokenized:
    """Token ids of the full rendering (cut to `max_len`) and the assistant loss mask.

    Cost: two prefix tokenizations per assistant turn; with `max_len`, turns that start past it
    are not rendered at all. Raises DataError when there is no assistant turn, when the first
    message is an assistant turn (nothing to render before it), or when the template is not
    prefix-stable (rendering a prefix is not a token prefix of rendering more)."""
    msgs = _normalise(messages)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not turns:
        raise DataError("conversation has no assistant turn: nothing to train on")
    if turns[0] == 0:
        raise DataError("conversation starts with an assistant turn: drop it before tokenizing")
    if max_len is not None and max_len <= 0:
        raise DataError(f"max_len must be positive, got {max_len}")
    eos = tokenizer.eos_token_id
    mask: list[int] = []
    prev: list[int] = []  # the longest rendering tokenized so far; every later one must extend it
    for i in turns:
        p = _encode(tokenizer, _render(tokenizer, msgs[:i], generation_prompt=True))
        _require_prefix(prev, p, i, "the previous turn's rendering", "the generation prompt")
        mask += [0] * (len(p) - len(mask))
        if max_len is not None and len(p) >= max_len:
            prev = p
            break
        q = _encode(tokenizer, _render(tokenizer, msgs[: i + 1], generation_prompt=False))
        _require_prefix(p, q, i, "the generation prompt", "the rendering with the reply")
        span = q[len(p) :]
        n = span.index(eos) + 1 if eos in span else len(span)
        if eos not in span:
            _warn_no_eos(tokenizer)
        mask += [1] * n + [0] * (len(span) - n)  # template glue after eos stays 0
        prev = q
        if max_len is not None and len(q) >= max_len:
            break
    else:
        if turns[-1] != len(msgs) - 1:  # trailing user/system messages: render everything
            full = _encode(tokenizer, _render(tokenizer, msgs, generation_prompt=False))
            _require_prefix(prev, full, len(msgs) - 1, "the last reply", "the full rendering")
            mask += [0] * (len(full) - len(mask))
            prev = full
    ids = prev[:max_len] if max_len is not None else prev
    return Tokenized(input_ids=ids, loss_mask=mask[: len(ids)])


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The rendering of `messages` with the generation prompt, ready for generation."""
    msgs = _normalise(messages)
    if not msgs:
        raise DataError("cannot build a prompt from an empty conversation")
    return _encode(tokenizer, _render(tokenizer, msgs, generation_prompt=True))


def _normalise(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    out = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"message {k} must be {{'role': one of {ROLES}, 'content': str}}")
        out.append({"role": role, "content": m["content"]})
    return out


def _render(tokenizer: Any, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The rendered text already holds the template's special tokens; this gives exactly the ids
    # of apply_chat_template(tokenize=True), which also passes add_special_tokens=False.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _require_prefix(a: list[int], b: list[int], i: int, what_a: str, what_b: str) -> None:
    if len(a) > len(b) or b[: len(a)] != a:
        raise DataError(
            f"chat template is not prefix-stable at message {i}: {what_a} is not a token prefix "
            f"of {what_b}, so the assistant loss mask cannot be derived by prefix rendering"
        )


def _warn_no_eos(tokenizer: Any) -> None:
    global _warned_no_eos
    if not _warned_no_eos:
        _warned_no_eos = True
        log.warning(
            "eos token %r not found in an assistant turn; masking the whole turn rendering",
            tokenizer.eos_token,
        )
