"""Training pieces: pair construction, the EAGLE loss, and the content-keyed drafter cache."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import taps.training.train as train_mod
from taps.config import CONF_DIR
from taps.training.datamodule import SEQ_BUCKET, PairDataset, collate
from taps.training.features import FeatureSet
from taps.training.losses import ROW_BUCKET, LossWeights, eagle_loss, supervised


def test_pairs_shift_tokens_targets_and_mask_together():
    ids = torch.tensor([10, 11, 12, 13, 14])
    f = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 3)
    mask = torch.tensor([0, 0, 1, 1, 0], dtype=torch.uint8)
    fs = FeatureSet(ids, f, mask, torch.tensor([0, 5]), {})
    ex = PairDataset(fs)[0]
    assert ex["tokens"].tolist() == [11, 12, 13, 14]  # f_t is paired with x_{t+1}
    assert ex["f_in"][:, 0].tolist() == [0, 1, 2, 3]
    assert ex["f_next"][:, 0].tolist() == [1, 2, 3, 4]  # g_t predicts f_{t+1}
    # position t is supervised when x_{t+1} is an assistant token: the first assistant token
    # (index 2) makes position 1 supervised, which the unshifted reference mask missed.
    assert ex["mask"].tolist() == [0, 1, 1, 0]
    batch = collate(
        [ex, PairDataset(FeatureSet(ids[:3], f[:3], mask[:3], torch.tensor([0, 3]), {}))[0]]
    )
    # lengths round up to SEQ_BUCKET so batch shapes repeat; padding is never supervised
    assert batch["tokens"].shape == (2, SEQ_BUCKET)
    assert batch["mask"][1, :4].tolist() == [0, 1, 0, 0] and batch["mask"][:, 4:].sum() == 0


def test_supervised_rows_come_in_buckets_with_padding_weighted_zero():
    mask = torch.zeros(3, 200, dtype=torch.uint8)
    mask[0, 5:60] = 1
    mask[2, 10:100] = 1
    rows = supervised(mask)
    assert len(rows.index) == 2 * ROW_BUCKET and int(rows.count) == 145
    assert rows.weight.sum() == 145 and not rows.weight[145:].any()
    real = rows.index[:145]
    assert torch.equal(real, mask.reshape(-1).nonzero().squeeze(-1))  # in order, real first
    assert int(supervised(torch.zeros(2, 5)).count) == 1  # a normaliser, never 0


def test_eagle_loss_terms():
    torch.manual_seed(0)
    W = torch.randn(50, 8)
    f = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]])
    loss, m = eagle_loss(f.clone(), f, mask, W, LossWeights())
    p = torch.softmax(f @ W.T, -1)
    entropy = -(p * p.log()).sum(-1)[mask.bool()].mean()
    assert m["feature_loss"] == 0
    assert torch.allclose(m["token_loss"], entropy, atol=1e-5)
    assert torch.allclose(loss, 0.1 * entropy, atol=1e-6)
    g = f.clone()
    g[~mask.bool()] += 5.0  # unsupervised positions do not count
    assert torch.allclose(eagle_loss(g, f, mask, W, LossWeights())[0], loss)
    g = f + 0.5 * mask[..., None]
    _, m2 = eagle_loss(g, f, mask, W, LossWeights())
    # HASS's top-K distillation term: -sum over the target's top 3 of p log q, p not renormalised
    loss3, m3 = eagle_loss(g, f, mask, W, LossWeights(), topk=3, topk_weight=2.0)
    sel = mask.bool()
    pt, q = p[sel], torch.log_softmax(g[sel] @ W.T, -1)
    top = pt.topk(3, dim=-1)
    want = -(top.values * q.gather(-1, top.indices)).sum(-1).mean()
    assert torch.allclose(m3["topk_loss"], want, atol=1e-5)
    assert torch.allclose(loss3, m2["loss"] + 2.0 * want, atol=1e-5)
    assert torch.allclose(m2["feature_loss"], torch.tensor(0.125))  # SmoothL1(0.5) = 0.125


def tiny_cfg(tmp_path, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "target=tiny_random",
                "data.max_len=192",
                "trainer.max_epochs=1",
                "data.components=[{source: mathinstruct, examples: 12}]",
                *extra,
            ],
        )
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path)
    return cfg


def train_tiny(tmp_path, cache_dir, *extra, callbacks=None):
    """ensure_drafter on the tiny target with a private drafter cache in tmp_path."""
    from hydra.utils import instantiate

    cfg = tiny_cfg(tmp_path, *extra)
    with open_dict(cfg):
        cfg.target.cache_dir = cache_dir  # reuse the converted tokenizer
    return train_mod.ensure_drafter(
        instantiate(cfg.target),
        cfg.drafter,
        cfg.data,
        cfg.trainer,
        cfg.paths.cache_dir,
        cfg.paths.data_dir,
        cfg.seed,
        callbacks=callbacks,
    )


def test_drafter_cache_hit_and_invalidation(tmp_path, monkeypatch, cache_dir):
    calls = []
    real_fit = train_mod.L.Trainer.fit

    def counting_fit(self, *a, **k):
        calls.append(1)
        return real_fit(self, *a, **k)

    monkeypatch.setattr(train_mod.L.Trainer, "fit", counting_fit)

    def ensure(*extra):
        return train_tiny(tmp_path, cache_dir, *extra)

    _, meta1 = ensure()
    _, meta2 = ensure()
    assert len(calls) == 1 and meta1["key"] == meta2["key"]  # second call: cache hit
    for change in (
        ["drafter.lr=0.002"],
        ["data.max_len=160"],
        ["seed=7"],
        ["data.components=[{source: mathinstruct, examples: 11}]"],
        ["trainer.max_epochs=2"],
        ["target.seed=1"],
        ["drafter.draft_vocab=512"],
        ["data.regenerate=true", "data.regenerate_max_tokens=16"],
        ["drafter=hass"],
        ["drafter.objective.token_weight=0.2"],
    ):
        _, meta = ensure(*change)
        assert meta["key"] != meta1["key"], change
    assert len(calls) == 11
    ensure("trainer.log_every_n_steps=3")  # cosmetic: still a hit
    assert len(calls) == 11
    assert not list((tmp_path / "drafters").glob(".*tmp*"))  # no half-written entries


def test_callbacks_group_builds_the_progress_bar():
    from pathlib import Path

    from omegaconf import OmegaConf

    from taps.training.progress import TokensPerSecondBar

    group = Path(CONF_DIR) / "callbacks"
    (bar,) = train_mod.build_callbacks(OmegaConf.load(group / "default.yaml"))
    assert isinstance(bar, TokensPerSecondBar) and bar.refresh_rate == 10
    assert train_mod.build_callbacks(OmegaConf.load(group / "none.yaml")) == []
    assert train_mod.build_callbacks(None) == []
    off = OmegaConf.merge(OmegaConf.load(group / "default.yaml"), {"progress": None})
    assert train_mod.build_callbacks(off) == []  # callbacks.progress=null disables it


def test_target_key_ignores_install_path(tmp_path, cache_dir):
    import json
    import shutil

    from taps.models.target import convert_gguf, smollm2_gguf_path, weights_key

    src = convert_gguf(smollm2_gguf_path(), cache_dir)
    a, b = tmp_path / "a", tmp_path / "b"
    for d, where in ((a, "/one/venv"), (b, "/another/venv")):
        d.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        cfg["_name_or_path"] = where
        (d / "config.json").write_text(json.dumps(cfg))
        shutil.copy(src / "model.safetensors", d / "model.safetensors")
    key = weights_key(a, [a / "model.safetensors"])
    assert key == weights_key(b, [b / "model.safetensors"])
    with open(b / "model.safetensors", "r+b") as f:  # different weights: different key
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert key != weights_key(b, [b / "model.safetensors"])
