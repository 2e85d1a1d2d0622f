"""Experiment loggers behind one small interface: W&B (offline by default) or nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NullRunLogger:
    """logger=none: results still go to files in the run dir."""

    def __init__(self, **settings: Any) -> None:
        pass  # group/name set by an experiment preset mean nothing without a logger

    def start(self, config: dict) -> None:
        pass

    def lightning_logger(self) -> Any:
        return None

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def log_image(self, name: str, path: str | Path) -> None:
        pass

    def log_summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass

    @property
    def run_dir(self) -> str | None:
        return None


class WandbRunLogger(NullRunLogger):
    """A W&B run whose files live inside the Hydra run dir (`wandb sync <dir>` uploads it)."""

    def __init__(
        self,
        project: str = "taps",
        mode: str = "offline",
        dir: str | None = None,
        group: str | None = None,
        name: str | None = None,
    ) -> None:
        self.kw = {"project": project, "mode": mode, "dir": dir, "group": group, "name": name}
        self.run = None
        self.config: dict = {}

    def start(self, config: dict) -> None:
        """Remember the config; the W&B run itself opens on first use, so a job that has
        nothing new to log (every cell cached, results unchanged) creates no run."""
        self.config = config

    def _open(self) -> Any:
        if self.run is None:
            import wandb

            if self.kw["dir"]:
                Path(self.kw["dir"]).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(config=self.config, reinit="create_new", **self.kw)
        return self.run

    def lightning_logger(self) -> Any:
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self._open())

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self._open().log({name: wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: str | Path) -> None:
        import wandb

        self._open().log({name: wandb.Image(str(path))})

    def log_summary(self, values: dict) -> None:
        self._open().summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None
