"""The onnxruntime backend: device parsing, the graph contract check, IO binding (on the CPU EP here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stepscore.errors import ConfigError
from stepscore.runtime.backend import OrtBackend, parse_device
from stepscore.runtime.packing import PackOptions, pack
from stepscore.runtime.types import Formatted


def test_parse_device() -> None:
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda") == ("cuda", 0)
    assert parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(ConfigError):
            parse_device(bad)


def test_io_binding_gives_the_same_scores(tiny_bundle: Callable[..., Path]) -> None:
    graph = tiny_bundle("trl") / "model.onnx"
    rng = np.random.default_rng(0)
    items = [Formatted(rng.integers(5, 200, 30 + 7 * k).astype(np.int32), np.array([9, 29], np.int32)) for k in range(5)]
    batch = pack(items, PackOptions(row_tokens=128))
    plain = OrtBackend(graph, io_binding=False).run(batch)
    bound = OrtBackend(graph, io_binding=True).run(batch)
    np.testing.assert_array_equal(plain, bound)


def test_cuda_without_the_gpu_build_is_a_clear_error(tiny_bundle: Callable[..., Path]) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigError, match=r"stepscore\[gpu\]"):
        OrtBackend(tiny_bundle("trl") / "model.onnx", "cuda:0")
