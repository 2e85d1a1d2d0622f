"""Training pairs from cached features: input (f_t, x_{t+1}), target f_{t+1}, mask[t+1].
For EAGLE-3 heads the input features are the auxiliary layers at t (FeatureSet.aux), and the
pairs carry `top`, the target's argmax at t+1 (its loss mask's "is the target's token drafted").

The mask is shifted together with the target (the reference code did not, leaving the first
assistant position unsupervised): position t is trained when x_{t+1} is an assistant token,
i.e. exactly the positions the head drafts from at inference.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from taps.training.features import FeatureSet, OnlineFeatures
from taps.training.resume import EpochBatchSampler, ResumableLoader


class PairDataset(Dataset):
    def __init__(self, fs: FeatureSet) -> None:
        self.fs = fs

    def __len__(self) -> int:
        return len(self.fs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.fs.features is None:  # online: the collate function computes the features
            a, b = int(self.fs.offsets[i]), int(self.fs.offsets[i + 1])
            return {"ids": self.fs.input_ids[a:b], "mask": self.fs.loss_mask[a:b]}
        ids, f, m = self.fs.example(i)
        f_in = f if self.fs.aux is None else self.fs.inputs(i)
        pair = {"f_in": f_in[:-1], "tokens": ids[1:], "f_next": f[1:], "mask": m[1:]}
        if self.fs.target_argmax is not None:
            a, b = int(self.fs.offsets[i]), int(self.fs.offsets[i + 1])
            pair["top"] = self.fs.target_argmax[a + 1 : b].long()
        return pair


SEQ_BUCKET = 32


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to a multiple of SEQ_BUCKET; padding has
    mask 0 and sits after real positions. Rounding bounds the batch shapes the matmuls see:
    oneDNN keeps a kernel per shape, and a new length every batch grew memory every step."""
    n = -(-max(len(b["tokens"]) for b in batch) // SEQ_BUCKET) * SEQ_BUCKET
    w, h = batch[0]["f_in"].shape[-1], batch[0]["f_next"].shape[-1]
    out = {
        "f_in": torch.zeros(len(batch), n, w, dtype=batch[0]["f_in"].dtype),
        "f_next": torch.zeros(len(batch), n, h, dtype=batch[0]["f_next"].dtype),
        "tokens": torch.zeros(len(batch), n, dtype=torch.long),
        "mask": torch.zeros(len(batch), n, dtype=torch.uint8),
    }
    if "top" in batch[0]:
        out["top"] = torch.zeros(len(batch), n, dtype=torch.long)
    for r, b in enumerate(batch):
        k = len(b["tokens"])
        for name in out:
            out[name][r, :k] = b[name]
    return out


class OnlineCollate:
    """Batches of token ids -> the same training pairs as `collate`, with the features computed
    by the frozen target on the padded batch (causal attention: padding changes nothing)."""

    def __init__(self, features: OnlineFeatures) -> None:
        self.features = features

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(b["ids"]) for b in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        for r, b in enumerate(batch):
            ids[r, : len(b["ids"])] = b["ids"]
        f, aux, top = self.features(ids)
        f_in = f if aux is None else aux
        pairs = []
        for r, b in enumerate(batch):
            k = len(b["ids"])
            pairs.append({"f_in": f_in[r, : k - 1], "tokens": b["ids"][1:],
                          "f_next": f[r, 1:k], "mask": b["mask"][1:]})  # fmt: skip
            if top is not None:
                pairs[-1]["top"] = top[r, 1:k].long()
        return collate(pairs)


class FeatureDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: FeatureSet,
        val: FeatureSet | None,
        batch_size: int,
        seed: int,
        online: OnlineFeatures | None = None,
    ) -> None:
        """`online`: the sets hold tokens only and each batch runs the target (data.features)."""
        super().__init__()
        self.train_set = PairDataset(train)
        self.val_set = PairDataset(val) if val is not None else None
        self.batch_size, self.seed = batch_size, seed
        self.collate = collate if online is None else OnlineCollate(online)
        self.sampler = EpochBatchSampler(len(self.train_set), batch_size, seed)

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:  # DDP: our sampler shards itself
            self.sampler.shard(trainer.global_rank, trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        # Own generators: creating an iterator draws a seed, which must not consume the global
        # RNG that drives input noise (a resumed run would otherwise get other noise).
        return ResumableLoader(
            self.train_set,
            batch_sampler=self.sampler,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            self.batch_size,
            shuffle=False,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.seed),
        )
