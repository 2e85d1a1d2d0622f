"""Loss masks derived from the chat template, checked with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from taps.data.conversations import DataError
from taps.data.sources import load_source
from taps.data.template import prompt_ids, tokenize_conversation

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"

# assistant contents mention the header words so a header leak cannot hide behind them
WITH_SYSTEM = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, says the assistant."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12\n\nThe user asked for 4*3."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": " You're welcome, the system is happy. "},
]
WITHOUT_SYSTEM = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green — and 緑 in Japanese."},
    {"role": "user", "content": "One more."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "trailing question without a reply"},
]
CONVERSATIONS = [WITH_SYSTEM, WITHOUT_SYSTEM]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of ones."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "no_system"])
def test_mask_covers_exactly_assistant_replies(smollm2_tokenizer, messages):
    tok = smollm2_tokenizer
    out = tokenize_conversation(tok, messages)
    reference = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert out.input_ids == reference
    assert len(out.loss_mask) == len(out.input_ids) and set(out.loss_mask) <= {0, 1}
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    runs = _runs(out.loss_mask)
    assert len(runs) == len(replies) == 3
    for (a, b), reply in zip(runs, replies, strict=True):
        assert tok.decode(out.input_ids[a:b]) == reply + "<|im_end|>"
        assert out.input_ids[b - 1] == tok.eos_token_id
        # the reply starts right after its header
        header_start = max(i for i in range(a) if out.input_ids[i] == im_start)
        assert tok.decode(out.input_ids[header_start:a]) == "<|im_start|>assistant\n"
    # every role header (<|im_start|>, role word, newline) is masked out
    starts = [i for i, t in enumerate(out.input_ids) if t == im_start]
    assert len(starts) == len(messages) + (messages[0]["role"] != "system")
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE spelling of "\n"
    for i in starts:
        end = out.input_ids.index(newline, i)
        assert tok.decode(out.input_ids[i + 1 : end]) in ("system", "user", "assistant")
        assert not any(out.loss_mask[i : end + 1])
    # nothing before the first reply is trained on, including SmolLM2's default system prompt
    first = runs[0][0]
    assert not any(out.loss_mask[:first])
    prefix_text = tok.decode(out.input_ids[:first])
    assert (DEFAULT_SYSTEM in prefix_text) == (messages[0]["role"] != "system")
    assert out.loss_mask[-1] == 0  # final "\n" (or trailing user turn)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "no_system"])
def test_prompt_ids_are_prefixes(smollm2_tokenizer, messages):
    tok = smollm2_tokenizer
    full = tokenize_conversation(tok, messages)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        p = prompt_ids(tok, messages[:k])
        assert full.input_ids[: len(p)] == p
        assert tok.decode(p).endswith("<|im_start|>assistant\n")
        assert full.loss_mask[len(p)] == 1 and full.loss_mask[len(p) - 1] == 0


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "no_system"])
def test_truncation_matches_full_rendering(smollm2_tokenizer, messages):
    full = tokenize_conversation(smollm2_tokenizer, messages)
    n = len(full.input_ids)
    for max_len in [1, 5, 30, 45, 60, 75, 90, n - 1, n, n + 10]:
        cut = tokenize_conversation(smollm2_tokenizer, messages, max_len=max_len)
        assert len(cut.input_ids) == min(max_len, n)
        assert cut.input_ids == full.input_ids[:max_len]
        assert cut.loss_mask == full.loss_mask[:max_len]


def test_bad_conversations(smollm2_tokenizer):
    tok = smollm2_tokenizer
    with pytest.raises(DataError, match="no assistant"):
        tokenize_conversation(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(DataError, match="starts with an assistant"):
        tokenize_conversation(tok, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(DataError, match="message 1"):
        tokenize_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "bot"}])
    with pytest.raises(DataError, match="empty"):
        prompt_ids(tok, [])


class CharTokenizer:
    """One token per character; '|' is eos. `stable=False` makes every rendering start with the
    message count, so a prefix rendering is no longer a prefix."""

    eos_token, eos_token_id = "|", ord("|")

    def __init__(self, stable: bool = True) -> None:
        self.stable = stable

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False):
        text = "" if self.stable else str(len(msgs))
        text += "".join(f"<{m['role'][0]}>{m['content']}|\n" for m in msgs)
        return text + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_mask_rule_on_a_toy_template():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]
    out = tokenize_conversation(CharTokenizer(), msgs)
    assert "".join(map(chr, out.input_ids)) == "<u>q|\n<a>ab|\n"
    assert out.loss_mask == [0] * 9 + [1, 1, 1, 0]  # "ab|" in, the glue "\n" out


def test_prefix_unstable_template_is_rejected():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_conversation(CharTokenizer(stable=False), msgs)


def test_sharegpt_sample_tokenizes(smollm2_tokenizer):
    convs, _ = load_source("sharegpt", None, limit=30, prefer="local")
    for c in convs:
        out = tokenize_conversation(smollm2_tokenizer, c.messages, max_len=256)
        assert 0 < len(out.input_ids) <= 256 and len(out.loss_mask) == len(out.input_ids)
    assert sum(sum(tokenize_conversation(smollm2_tokenizer, c.messages).loss_mask) for c in convs)
