"""Checkpoint reading: bf16/fp16/fp32 safetensors parsed without torch, sharded folders, .bin files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stepscore.errors import ExportError
from stepscore.export.weights import WeightStore


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_safetensors_dtypes_match_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    t = (torch.randn(7, 5) * 3).to(dtype)
    save_file({"a.weight": t}, str(tmp_path / "model.safetensors"))
    got = WeightStore(tmp_path).get("a.weight")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t.float().numpy())


def test_sharded_folder_and_bin_fallback(tmp_path: Path) -> None:
    a, b = torch.randn(3), torch.randn(2, 2)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    store = WeightStore(tmp_path)
    assert store.names() == ["a", "b"]
    np.testing.assert_array_equal(store.get("b"), b.numpy())

    bins = tmp_path / "bin"
    bins.mkdir()
    torch.save({"c": torch.arange(4.0)}, bins / "pytorch_model.bin")
    np.testing.assert_array_equal(WeightStore(bins).get("c"), np.arange(4.0, dtype=np.float32))


def test_missing_weights_and_tensor_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no \*\.safetensors"):
        WeightStore(tmp_path)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ExportError, match="no tensor 'b'"):
        WeightStore(tmp_path).get("b")
