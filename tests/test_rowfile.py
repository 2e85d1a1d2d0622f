"""Feature files written row by row and read by row ranges: ordinary safetensors, every row as
written, a cut file named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from taps.training.rowfile import RowFile, RowWriter


def test_rows_written_in_any_order_read_back_exactly(tmp_path):
    f = tmp_path / "x.safetensors"
    feats = torch.randn(10, 6).to(torch.bfloat16)
    ids = torch.arange(10)
    w = RowWriter(f, {"ids": (torch.long, (10,)), "features": (torch.bfloat16, (10, 6))})
    w.write("features", 7, feats[7:])  # out of order, as length-sorted batches finish
    w.write("features", 0, feats[:7])
    w.write("ids", 0, ids)
    w.close()
    back = load_file(str(f))  # a plain safetensors file for any reader
    assert torch.equal(back["features"], feats) and torch.equal(back["ids"], ids)
    rows = RowFile(f, "features")
    assert len(rows) == 10 and torch.equal(rows[3:8], feats[3:8])
    assert rows[4:4].shape == (0, 6)
    with pytest.raises(ValueError, match="no tensor 'aux'"):
        RowFile(f, "aux")
    data = f.read_bytes()
    f.write_bytes(data[:-20])  # cut short: the last rows are missing
    with pytest.raises(ValueError, match="cut short"):
        RowFile(f, "features")[8:10]


def test_features_mode_auto_caches_small_and_streams_large():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from taps.training.train import features_mode

    data = OmegaConf.create({"features": "auto", "max_len": 512, "features_disk_gb": 64,
                             "feature_dtype": "bfloat16"})  # fmt: skip
    small = SimpleNamespace(train=[0] * 3000, val=[0] * 60)
    large = SimpleNamespace(train=[0] * 70000, val=[0] * 1400)
    assert features_mode(data, small, 576, (2, 15, 27)) == "cached"  # SmolLM2: under 7 GB
    assert features_mode(data, large, 4096, (2, 16, 29)) == "online"  # an 8B target: TBs
    data.features = "online"
    assert features_mode(data, small, 576, ()) == "online"
    data.features = "disk"
    with pytest.raises(ValueError, match="data.features='disk'"):
        features_mode(data, small, 576, ())
