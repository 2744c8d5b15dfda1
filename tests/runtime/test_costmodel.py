"""The start-up cost model: the fit recovers a run's cost terms, measurement is driven by the clock it is
given, the cache is keyed by what changes the cost, and the engine takes only the ratios left to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from stepscore.runtime import costmodel
from stepscore.runtime.backend import OrtBackend
from stepscore.runtime.bundle import load_bundle
from stepscore.runtime.config import EngineConfig
from stepscore.runtime.costmodel import CostModel, RunCost, fit, measure
from stepscore.runtime.engine import measured_config
from stepscore.runtime.packing import PackedBatch

TRUE_TREE = RunCost(run_s=2e-4, token_s=5e-6, attention_s=4e-9)
TRUE_PLAIN = RunCost(run_s=1e-4, token_s=4e-6, attention_s=2e-9)


def test_fit_recovers_the_terms() -> None:
    samples = [(r, s, TRUE_TREE.seconds(r, s)) for r, s in costmodel.SHAPES]
    got = fit(samples)
    assert got.run_s == pytest.approx(TRUE_TREE.run_s, rel=1e-6)
    assert got.token_s == pytest.approx(TRUE_TREE.token_s, rel=1e-6)
    assert got.attention_s == pytest.approx(TRUE_TREE.attention_s, rel=1e-6)


def test_fit_keeps_every_term_positive() -> None:
    # noise that would make the run term negative
    samples = [(1, 64, 1e-5), (4, 64, 5e-5), (1, 256, 4e-5), (1, 512, 9e-5)]
    got = fit(samples)
    assert got.run_s > 0 and got.token_s > 0 and got.attention_s > 0


class FakeDevice:
    """A device whose runs cost exactly what a known model says, on a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.runs = 0

    def clock(self) -> float:
        return self.now

    def run(self, batch: PackedBatch) -> None:
        rows, length = batch.shape
        self.now += (TRUE_PLAIN if batch.seq_lens is not None else TRUE_TREE).seconds(rows, length)
        self.runs += 1


def test_measure_times_both_graphs_and_the_ratios_follow() -> None:
    device = FakeDevice()
    model = measure(device.run, has_plain=True, max_tokens=4096, max_row=2048, clock=device.clock)
    assert model.tree.token_s == pytest.approx(TRUE_TREE.token_s, rel=1e-6)
    assert model.plain is not None and model.plain.token_s == pytest.approx(TRUE_PLAIN.token_s, rel=1e-6)
    assert model.attention_cost() == pytest.approx(TRUE_TREE.attention_s / TRUE_TREE.token_s, rel=1e-6)
    assert model.plain_cost(512) == pytest.approx(TRUE_PLAIN.seconds(1, 512) / TRUE_TREE.seconds(1, 512), rel=1e-6)
    assert model.run_overhead_tokens() == pytest.approx(TRUE_TREE.run_s / TRUE_TREE.token_s, rel=1e-6)
    # shapes beyond the limits are not run
    small = FakeDevice()
    measure(small.run, has_plain=False, max_tokens=256, max_row=256, clock=small.clock)
    assert small.runs == (costmodel.REPEATS + 1) * sum(1 for r, s in costmodel.SHAPES if r * s <= 256 and s <= 256)


def test_cache_round_trip_and_key(tmp_path: Path) -> None:
    model = CostModel(TRUE_TREE, TRUE_PLAIN)
    key = costmodel.cache_key("abc", "cpu", 2, "1.32.0")
    costmodel.store(tmp_path, key, model)
    assert costmodel.load_cached(tmp_path, key) == model
    assert costmodel.load_cached(tmp_path, {**key, "threads": "4"}) is None  # another setting: measure again
    (tmp_path / costmodel.CACHE_FILE).write_text("{not json")
    assert costmodel.load_cached(tmp_path, key) is None


def test_engine_takes_only_the_ratios_left_to_it(tiny_bundle: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("trl"), bundle_dir)
    bundle = load_bundle(bundle_dir)
    backend = OrtBackend(bundle.graph_path, plain_graph_path=bundle.plain_graph_path)
    config = measured_config(bundle, backend, EngineConfig())
    assert config.attention_cost > 0 and config.plain_cost > 0 and config.run_overhead_tokens > 0
    assert (bundle_dir / costmodel.CACHE_FILE).is_file()  # measured once, then read back
    again = measured_config(bundle, backend, EngineConfig())
    assert (again.attention_cost, again.plain_cost) == (config.attention_cost, config.plain_cost)
    explicit = measured_config(bundle, backend, replace(EngineConfig(), attention_cost=0.5, plain_cost=0.8))
    assert (explicit.attention_cost, explicit.plain_cost) == (0.5, 0.8)
    assert explicit.run_overhead_tokens == config.run_overhead_tokens
    off = measured_config(bundle, backend, EngineConfig(measure_cost=False))
    assert off == EngineConfig(measure_cost=False)
