"""The onnxruntime backend: device parsing, the graph contract check, IO binding (on the CPU EP here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stepscore.errors import ConfigError
from stepscore.runtime.backend import MemoryRelease, OrtBackend, parse_device
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


def test_memory_release_is_spaced_out_in_time() -> None:
    now = [100.0]
    trims: list[int] = []
    release = MemoryRelease(interval=2.0, trim=trims.append, clock=lambda: now[0])
    assert release.due()  # the first run releases
    release.released()
    assert trims == [0] and release.releases == 1
    now[0] = 101.9
    assert not release.due()
    now[0] = 102.0
    assert release.due()
    release.released()
    now[0] = 103.0
    assert not release.due()
    assert trims == [0, 0] and release.releases == 2
    with pytest.raises(ValueError):
        MemoryRelease(interval=-1.0)


def test_memory_release_without_trim_counts_releases() -> None:
    release = MemoryRelease(interval=0.0)  # no C library trim (musl, macOS): the arena still shrinks
    assert release.due()
    release.released()
    assert release.due() and release.releases == 1


def test_releasing_runs_give_the_same_scores(tiny_bundle: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that shrinks onnxruntime's arena and trims the heap scores exactly as one that does not."""
    graph = tiny_bundle("trl") / "model.onnx"
    rng = np.random.default_rng(1)
    batches = [
        pack(
            [Formatted(rng.integers(5, 200, 20 + 9 * k).astype(np.int32), np.array([9, 19], np.int32)) for k in range(n)],
            PackOptions(row_tokens=64 * n),
        )
        for n in (1, 4, 2)
    ]
    monkeypatch.setattr(OrtBackend, "shrink_cpu_arena", False)
    monkeypatch.setattr(OrtBackend, "trim_after_runs", False)
    plain = OrtBackend(graph)
    assert plain._release is None
    expected = [plain.run(b) for b in batches]
    monkeypatch.setattr(OrtBackend, "shrink_cpu_arena", True)
    monkeypatch.setattr(OrtBackend, "trim_after_runs", True)
    monkeypatch.setattr(OrtBackend, "release_interval", 0.0)  # every run releases
    for io_binding in (False, True):
        releasing = OrtBackend(graph, io_binding=io_binding)
        for batch, want in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(releasing.run(batch), want)
        assert releasing._release is not None and releasing._release.releases == len(batches)
