"""Systems: every system scores the same tokens the same way; counters say what each computed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from stepscore.runtime.bench.drivers import closed_loop
from stepscore.runtime.bench.systems import (
    BatchCounters,
    EngineSystem,
    HfEagerSystem,
    NaiveOrtSystem,
    ServiceSystem,
    System,
    counters_from_metrics,
    parse_prometheus,
)
from stepscore.runtime.bench.workloads import load_workload
from stepscore.runtime.config import EngineConfig, default_max_batch_tokens
from stepscore.runtime.types import ScoreRequest


async def _score_all(system: System, reqs: Sequence[ScoreRequest]) -> tuple[np.ndarray, BatchCounters | None]:
    await system.setup()
    try:
        results = await asyncio.gather(*(system.score(r) for r in reqs))
        counters = await system.counters()
    finally:
        await system.close()
    for request, result in zip(reqs, results, strict=True):
        assert result.request_id == request.request_id and len(result.candidates) == len(request.candidates)
        assert all(c.num_tokens > 0 and set(c.aggregates) == {"min"} for c in result.candidates)
    return np.concatenate([c.step_scores for r in results for c in r.candidates]), counters


def test_engine_baselines_agree(tiny_bundle: Callable[..., Path], tiny_model: Callable[[str], Path]) -> None:
    pytest.importorskip("torch", reason="the PyTorch eager baseline needs torch (the export extra)")
    bundle = tiny_bundle("qwen-prm")
    reqs = load_workload("synthetic-beam", limit=3, synthetic_scale=0.1, truncate_left=True).requests
    engine, c_engine = asyncio.run(_score_all(EngineSystem(bundle, config=EngineConfig(intra_op_threads=1)), reqs))
    naive, c_naive = asyncio.run(_score_all(NaiveOrtSystem(bundle, threads=1, max_batch_tokens=2048), reqs))
    hf, c_hf = asyncio.run(_score_all(HfEagerSystem(tiny_model("qwen-prm"), bundle, threads=1), reqs))
    assert engine.shape == naive.shape == hf.shape
    np.testing.assert_allclose(naive, engine, atol=1e-5)
    np.testing.assert_allclose(hf, engine, atol=1e-4)  # transformers' own body, padded batches of 8
    assert c_engine is not None and c_naive is not None and c_hf is not None
    submitted = c_engine.tokens_submitted
    assert c_naive.tokens_submitted == c_hf.tokens_submitted == submitted
    # beam candidates share prefixes: the engine lays them out once; the baselines compute every copy
    assert c_engine.tokens_used < submitted and c_naive.tokens_used == c_hf.tokens_used == submitted
    assert c_hf.batches == sum(-(-len(r.candidates) // 8) for r in reqs)


def test_sequential_baseline_reports_lock_wait_as_queue_time(tiny_bundle: Callable[..., Path]) -> None:
    reqs = load_workload("synthetic", limit=4, synthetic_scale=0.05, truncate_left=True).requests
    system = NaiveOrtSystem(tiny_bundle("qwen-prm"), threads=1)

    async def run() -> list[float]:
        await system.setup()
        try:
            point = await closed_loop(system, reqs, 4)
        finally:
            await system.close()
        return sorted(r.queue_ms or 0.0 for r in point.records)

    queue = asyncio.run(run())
    assert queue[0] < queue[-1] and queue[-1] > 0.0  # the last of four waited for the three before it


def test_parse_prometheus() -> None:
    text = "\n".join(
        [
            "# HELP stepscore_tokens_total Tokens by kind",
            "# TYPE stepscore_tokens_total counter",
            'stepscore_tokens_total{kind="submitted"} 1200.0',
            'stepscore_tokens_total{kind="used"} 700.0',
            'stepscore_tokens_total{kind="computed"} 800.0',
            'stepscore_requests_total{method="Score",code="OK"} 3.0',
            "stepscore_batch_tokens_count 4.0",
            "stepscore_batch_tokens_sum 800.0",
        ]
    )
    metrics = parse_prometheus(text)
    assert metrics['stepscore_requests_total{method="Score",code="OK"}'] == 3.0
    assert counters_from_metrics(metrics) == BatchCounters(4, 1200, 700, 800)
    assert counters_from_metrics({}) is None


def test_points_start_with_an_empty_prefix_cache() -> None:
    """The same requests twice, in-process and through a live server: with forget() between, the second point
    finds in the cache only what its own earlier calls left (the same share as the first); without, it would
    find nearly everything."""
    from stepscore.runtime.bench.drivers import sweep
    from stepscore.runtime.bench.report import summarize
    from stepscore.runtime.default_model import default_bundle

    reqs = load_workload("arith-beam", limit=12).requests
    for system in (
        EngineSystem(default_bundle(), config=EngineConfig(intra_op_threads=1, cache_bytes=64 << 20)),
        ServiceSystem.spawn(default_bundle(), ["--threads", "1", "--cache-mb", "64"]),
    ):

        async def run(system: System = system) -> tuple[float, float, float]:
            await system.setup()
            try:
                first, second = (summarize(p).cache_hit for p in await sweep(system, reqs, concurrency=(1, 1)))
                again = summarize(await closed_loop(system, reqs, 1)).cache_hit  # no forget(): all from the cache
            finally:
                await system.close()
            return first, second, again

        first, second, again = asyncio.run(run())
        # beam iterations extend earlier ones: a cold point still answers part of its tokens from itself
        assert 0 < first == second < again, (system.name, first, second, again)


def test_spawned_server(tiny_bundle: Callable[..., Path]) -> None:
    """--serve: a real `stepscore serve` child process, its metrics scraped, stopped with SIGTERM."""
    bundle = tiny_bundle("qwen-prm")
    reqs = load_workload("synthetic", limit=3, synthetic_scale=0.05, truncate_left=True).requests
    system = ServiceSystem.spawn(bundle, ["--threads", "1"])

    async def run() -> None:
        await system.setup()
        try:
            assert system.max_batch_tokens == default_max_batch_tokens("cpu") == 2048  # the device default
            point = await closed_loop(system, reqs, 2)
            server = system.server
            assert server is not None and server.pid is not None
            # the pid is the server's own, re-executed or not: the benchmarks read its memory there
            assert sys.platform != "linux" or "stepscore.cli" in Path(f"/proc/{server.pid}/cmdline").read_text()
        finally:
            await system.close()
        assert all(r.ok and r.tokens > 0 for r in point.records)
        assert point.counters is not None and point.counters.batches > 0
        assert point.counters.tokens_submitted == sum(r.tokens for r in point.records)

    asyncio.run(run())
    assert system.server is not None and system.server.returncode == 0  # SIGTERM: drained, exit 0
    assert any("stopped" in line for line in system.server.output)
