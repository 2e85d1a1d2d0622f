"""`python -m taps.export ckpt=<drafter dir> [engine=vllm|sglang|eagle] [out=<dir>]`: a trained
head in the layout a serving engine loads (taps/models/serving.py; `engine=eagle`: the published
EAGLE-1/2 layout, taps/models/eagle_format.py). `what=target` writes the target itself as a
plain Hugging Face directory. Hydra-style key=value overrides of conf/export.yaml;
`target=tiny_random` etc. pick the target the head was trained on."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from taps.config import CONF_DIR
from taps.models.eagle_format import export_eagle
from taps.models.heads import load_head
from taps.models.serving import ENGINES, export_head

log = logging.getLogger("taps.export")


def export_target(cfg: DictConfig) -> Path:
    """The target as a Hugging Face directory (config.json with its architecture,
    model.safetensors, tokenizer): what vLLM, SGLang and transformers load."""
    target = instantiate(cfg.target)
    src = Path(getattr(target, "source_dir", "") or "")
    if not (src / "config.json").is_file():
        raise ValueError(f"target {target.name} has no directory on disk to export")
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "export" / src.name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("MANIFEST.json"))
    config = json.loads((out / "config.json").read_text())
    # A GGUF-converted config names no architecture; vLLM and SGLang pick the class by it.
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def export_drafter(cfg: DictConfig) -> Path:
    ckpt = Path(cfg.ckpt)
    if not (ckpt / "head.safetensors").is_file():
        what = "does not exist" if not ckpt.exists() else "has no head.safetensors"
        raise FileNotFoundError(f"ckpt={ckpt} {what} (expected a drafter dir from training)")
    target = instantiate(cfg.target)
    head, meta = load_head(ckpt, target.model)
    trained_on = (meta.get("target") or {}).get("key")
    if trained_on and trained_on != target.key:
        # The export carries the target's embedding or config: another target's would be wrong.
        raise ValueError(
            f"{ckpt} was trained on target {meta['target'].get('name')} (key {trained_on}), "
            f"not {target.name} (key {target.key}): pass the matching target=..."
        )
    out = Path(cfg.out) if cfg.out else ckpt.with_name(f"{ckpt.name}-{cfg.engine}")
    if cfg.engine == "eagle":
        if head.kind != "eagle2":
            raise ValueError(
                "engine=eagle writes EAGLE-1/2 heads; EAGLE-3 heads: engine=vllm|sglang"
            )
        return export_eagle(head, target.model.config, out, embed=cfg.embed, fmt=cfg.weights)
    verifier = cfg.verifier or str(getattr(target, "source_dir", "") or target.name)
    return export_head(head, target.model.config, out, cfg.engine, verifier,
                       int(cfg.speculative_tokens))  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=overrides)
    if cfg.engine not in ENGINES:
        raise ValueError(f"engine={cfg.engine}: expected one of {list(ENGINES)}")
    if cfg.what == "target":
        out = export_target(cfg)
    elif cfg.what == "drafter":
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise ValueError("ckpt=<drafter directory> is required (one holding head.safetensors)")
        out = export_drafter(cfg)
    else:
        raise ValueError(f"what={cfg.what}: expected drafter or target")
    log.info("exported %s -> %s", cfg.what, out)
    print(out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
