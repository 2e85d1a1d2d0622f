"""`python -m taps.export ckpt=<drafter dir> format=eagle out=<dir>`: a trained head in the
published EAGLE-1/2 layout (see taps/models/eagle_format.py). Hydra-style key=value overrides
of conf/export.yaml; `target=tiny_random` etc. pick the target the head was trained on."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from taps.config import CONF_DIR
from taps.models.eagle_format import export_eagle
from taps.models.heads import load_head

log = logging.getLogger("taps.export")
FORMATS = {"eagle"}


def main(argv: list[str] | None = None) -> Path:
    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=overrides)
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ValueError("ckpt=<drafter directory> is required (one holding head.safetensors)")
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format}: expected one of {sorted(FORMATS)}")
    ckpt = Path(cfg.ckpt)
    if not (ckpt / "head.safetensors").is_file():
        what = "does not exist" if not ckpt.exists() else "has no head.safetensors"
        raise FileNotFoundError(f"ckpt={ckpt} {what} (expected a drafter dir from training)")
    target = instantiate(cfg.target)
    head, meta = load_head(ckpt, target.model)
    trained_on = (meta.get("target") or {}).get("key")
    if trained_on and trained_on != target.key:
        # The export carries the target's embedding: another target's would be silently wrong.
        raise ValueError(
            f"{ckpt} was trained on target {meta['target'].get('name')} (key {trained_on}), "
            f"not {target.name} (key {target.key}): pass the matching target=..."
        )
    out = Path(cfg.out) if cfg.out else ckpt.with_name(ckpt.name + "-eagle")
    export_eagle(head, target.model.config, out, embed=cfg.embed, fmt=cfg.weights)
    log.info("exported %s -> %s", ckpt, out)
    print(out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
