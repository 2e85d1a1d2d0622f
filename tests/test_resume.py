"""Training interrupted by SIGKILL mid-epoch resumes from its last checkpoint and ends exactly
where an uninterrupted run ends: same step count, same weights (no lost or repeated steps)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_training import train_tiny

ROOT = Path(__file__).resolve().parents[1]
# About 34 usable training conversations, batch 2: 17 steps an epoch, 34 in all; checkpoints
# every 4 steps and at each epoch end.
SETTINGS = [
    "data.components=[{source: mathinstruct, examples: 40}]",
    # float32 features and training: bf16 on an AVX512-BF16 CPU (no AMX) is not
    # bit-reproducible from one process to the next (the killed run's features come from
    # another process; fc.bias differed by 4-6e-5 in 1 of 4 runs), and the claim here is
    # about resuming (data order, noise, optimizer state), not about oneDNN's bf16 kernels.
    "trainer.precision=32-true",
    "data.feature_compute_dtype=float32",
    "drafter.batch_size=2",
    "trainer.max_epochs=2",
    "trainer.checkpoint_every=4",
]
KILL_AT = 27  # mid-way through the second epoch, 3 steps after the checkpoint at step 24

CHILD = """
import os, signal, sys
from pathlib import Path
import lightning as L
sys.path.insert(0, {root!r})
from tests.test_training import train_tiny

class KillAt(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == {kill}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a lost machine

train_tiny(Path({tmp!r}), {cache!r}, *{settings!r}, callbacks=[KillAt()])
"""


def _drafter_dirs(root: Path) -> list[Path]:
    return sorted((root / "drafters").iterdir())


def test_killed_training_resumes_without_lost_steps(tmp_path, cache_dir):
    ref_head, ref = train_tiny(tmp_path / "ref", cache_dir, *SETTINGS)
    steps = ref["global_step"]
    assert steps // 2 < KILL_AT < steps and not ref["resumed"]  # the kill lands in epoch 2

    run = tmp_path / "run"
    run.mkdir()
    code = CHILD.format(root=str(ROOT), kill=KILL_AT, tmp=str(run), cache=cache_dir,
                        settings=SETTINGS)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, not finished
    (partial,) = _drafter_dirs(run)
    assert partial.name.endswith(".partial") and (partial / "last.ckpt").is_file()
    ckpt = torch.load(partial / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 24  # the kill came after 3 more steps that were never saved

    head, meta = train_tiny(run, cache_dir, *SETTINGS)
    assert meta["resumed"] and meta["global_step"] == ref["global_step"]
    assert meta["key"] == ref["key"]
    (final,) = _drafter_dirs(run)  # the work dir is gone, the cache entry is complete
    assert final.name == partial.name.removesuffix(".partial")
    a = load_file(final / "head.safetensors")
    b = load_file(_drafter_dirs(tmp_path / "ref")[0] / "head.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # Same batches in the same order with the same noise: the weights agree exactly.
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert os.listdir(final)  # nothing half-written
    # The training history keeps the killed segment's steps, not only the last segment's.
    with open(final / "metrics.csv", newline="") as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
    assert min(steps) < 24 <= max(steps) and steps == sorted(steps)
