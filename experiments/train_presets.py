"""Train the CPU-preset drafters of every kind on the same data, one process (shared target and
cached features, regenerated data), and print their held-out metrics.

    python experiments/train_presets.py [drafter=eagle2,hass,eagle3] [data=mathinstruct,sharegpt]
        [extra Hydra overrides ...]

Each (drafter, data) goes through `ensure_drafter`, exactly as `python -m taps.run drafter=D
data=X` would train it, so the runs that evaluate them find them cached.
"""

from __future__ import annotations

import sys
import time

from hydra import compose, initialize_config_dir

from taps.config import CONF_DIR, register_resolvers
from taps.data.drafters import drafter_data
from taps.models.target import shared_target
from taps.training.train import build_callbacks, ensure_drafter


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("drafter", "data"))
    extra = [a for a in argv if a.split("=", 1)[0] not in ("drafter", "data")]
    register_resolvers()
    for data in opts.get("data", "mathinstruct,sharegpt").split(","):
        for kind in opts.get("drafter", "eagle2,hass,eagle3").split(","):
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", [f"drafter={kind}", f"data={data}", *extra])
            (d,) = drafter_data(cfg.data, cfg.drafters, False)
            t0 = time.perf_counter()
            _, meta = ensure_drafter(shared_target(cfg.target), cfg.drafter, d, cfg.trainer,
                                     cfg.paths.cache_dir, cfg.paths.data_dir, cfg.seed,
                                     callbacks=build_callbacks(cfg.callbacks))  # fmt: skip
            m = meta.get("final_metrics", {})
            keys = ("val/top1_d1", "val/top1_d2", "val/top1_d3", "val/top1_d5", "val/sim_tau")
            print(f"{kind} {data} {meta['key']}: " + ", ".join(f"{k} {m.get(k, float('nan')):.3f}"
                  for k in keys) + f"; {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
