"""Data layer: conversation sources, training mixtures, chat-template masks, benchmark prompts.

Imports stay light: `datasets` is imported only when the hub is actually tried, and nothing here
imports transformers (the tokenizer is passed in)."""

from __future__ import annotations

from taps.data.benchmarks import BENCHMARKS, BenchPrompt, load_benchmark
from taps.data.conversations import Conversation, DataError
from taps.data.mixture import DataSplit, build_mixture
from taps.data.sources import SOURCES, SourceInfo, load_source
from taps.data.template import Tokenized, prompt_ids, tokenize_conversation

__all__ = [
    "BENCHMARKS",
    "SOURCES",
    "BenchPrompt",
    "Conversation",
    "DataError",
    "DataSplit",
    "SourceInfo",
    "Tokenized",
    "build_mixture",
    "load_benchmark",
    "load_source",
    "prompt_ids",
    "tokenize_conversation",
]
