"""The prefix cache through the engine and the cached graph: cached scores equal scoring from scratch.

Each test runs two engines on one tiny bundle, one with the prefix cache and one without, and compares
every score (fp32: 1e-5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscore.runtime.config import EngineConfig
from stepscore.runtime.engine import Engine
from stepscore.runtime.types import ScoreRequest, ScoreResult

PROBLEM = "Compute the sum of the first four squares."
STEPS = [
    "1 + 4 = 5.",
    "5 + 9 = 14.",
    "14 + 16 = 30.",
    "So the answer is 30.",
    "Check: 30 - 16 = 14.",
    "Another try: 1 + 4 + 9 = 15.",
    "Wrong: 15 + 16 = 32.",
    "The answer is \\boxed{30}.",
]
TOL = 1e-5


def _config(cache_bytes: int, **extra: float) -> EngineConfig:
    return EngineConfig(cache_bytes=cache_bytes, max_wait_ms=extra.pop("max_wait_ms", 1.0), **extra)  # type: ignore[arg-type]


async def _both(
    bundle: Path, requests: list[list[ScoreRequest]], cache_bytes: int, attention_cost: float = -1.0
) -> tuple[list[ScoreResult], Engine]:
    """Score each wave of requests concurrently (waves one after the other) with the cache and without; assert
    the scores agree; return the cached engine's results (the engine is closed, its cache still readable).

    `attention_cost` 0 makes the packer always continue the cached pasts; a large one makes it recompute
    rows from an ancestor of the cached pasts or from scratch where cheaper (pack_cached): every layout must
    give the same scores."""
    async with (
        Engine.from_bundle(bundle, config=_config(0)) as plain,
        Engine.from_bundle(bundle, config=_config(cache_bytes, attention_cost=attention_cost)) as cached,
    ):
        assert cached.cache is not None and plain.cache is None
        out: list[ScoreResult] = []
        for wave in requests:
            want = await asyncio.gather(*(plain.score(r) for r in wave))
            got = await asyncio.gather(*(cached.score(r) for r in wave))
            for w, g in zip(want, got, strict=True):
                for cw, cg in zip(w.candidates, g.candidates, strict=True):
                    assert len(cw.step_scores) == len(cg.step_scores)
                    np.testing.assert_allclose(cg.step_scores, cw.step_scores, atol=TOL, rtol=0)
                    for name, value in cw.aggregates.items():
                        assert abs(cg.aggregates[name] - value) <= TOL
            out.extend(got)
            cached.cache.check()
        return out, cached


@pytest.mark.parametrize(
    ("kind", "attention_cost"), [("qwen-prm", 0.0), ("qwen-prm", 10.0), ("math-shepherd", 0.0), ("rlhflow", 0.0)]
)
def test_step_by_step_calls_reuse_every_earlier_step(
    tiny_bundle: Callable[..., Path], kind: str, attention_cost: float
) -> None:
    bundle = tiny_bundle(kind)
    waves = [[ScoreRequest(PROBLEM, [STEPS[:k]], search_id="s", aggregates=("min",))] for k in range(1, 6)]
    results, engine = asyncio.run(_both(bundle, waves, 64 << 20, attention_cost))
    cached = [r.candidates[0].cached_tokens for r in results]
    sizes = [r.candidates[0].num_tokens for r in results]
    assert cached[0] == 0
    # every later call finds the whole previous chain (the formats cut no merge across a step boundary here)
    assert cached[1:] == sizes[:-1]
    assert engine.cache is not None and engine.cache.stats.hit_tokens == sum(sizes[:-1])


def test_beam_like_calls_with_many_candidates_and_concurrent_requests(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("qwen-prm")
    beams = [STEPS[:2], [*STEPS[:1], STEPS[5]], STEPS[:3]]
    wave1 = [ScoreRequest(PROBLEM, beams, search_id="b1"), ScoreRequest(PROBLEM, [STEPS[:1]], search_id="b2")]
    # next iteration: each beam plus two next steps, several requests at once (rows with different pasts)
    wave2 = [
        ScoreRequest(PROBLEM, [[*b, STEPS[6]], [*b, STEPS[7]]], search_id="b1", request_id=str(i)) for i, b in enumerate(beams)
    ]
    wave2.append(ScoreRequest(PROBLEM, [STEPS[:1], STEPS[:2]], search_id="b2"))  # fully cached + one step
    results, _ = asyncio.run(_both(bundle, [wave1, wave2], 64 << 20))
    for r in results[2:5]:
        assert all(c.cached_tokens > 0 for c in r.candidates)
    assert results[5].candidates[0].cached_tokens == results[5].candidates[0].num_tokens


def test_truncated_candidates_bypass_the_cache(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("qwen-prm")

    async def run() -> tuple[ScoreResult, ScoreResult]:
        config = EngineConfig(cache_bytes=64 << 20, max_wait_ms=1.0, max_seq_len=60)
        async with Engine.from_bundle(bundle, config=config) as engine:
            request = ScoreRequest(PROBLEM, [STEPS[:6]], truncate_left=True)
            first, second = await engine.score(request), await engine.score(request)
            assert engine.cache is not None and engine.cache.stats.entries == 0
            return first, second

    first, second = asyncio.run(run())
    assert first.candidates[0].num_tokens == 60  # cut from the left (here inside the problem: every step kept)
    assert second.candidates[0].cached_tokens == 0
    assert first.candidates[0].step_scores == second.candidates[0].step_scores


def test_identical_requests_arriving_together_compute_their_prefix_once(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("qwen-prm")

    async def run() -> tuple[int, int]:
        # a long wait: both requests are in the queue before the first batch is planned
        config = EngineConfig(cache_bytes=64 << 20, max_wait_ms=1000.0)
        async with Engine.from_bundle(bundle, config=config) as engine:
            request = ScoreRequest(PROBLEM, [STEPS[:4]])
            a, b = await asyncio.gather(engine.score(request), engine.score(request))
            assert a.candidates[0].step_scores == b.candidates[0].step_scores
            return engine.stats.tokens_used, a.candidates[0].num_tokens

    used, size = asyncio.run(run())
    assert used == size  # one tree row computed the shared chain once


def test_end_search_frees_and_no_cache_means_nothing_to_free(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("qwen-prm")

    async def run() -> tuple[int, int, int]:
        async with (
            Engine.from_bundle(bundle, config=_config(64 << 20)) as engine,
            Engine.from_bundle(bundle, config=_config(0)) as off,
        ):
            await engine.score(ScoreRequest(PROBLEM, [STEPS[:3]], search_id="done"))
            await off.score(ScoreRequest(PROBLEM, [STEPS[:3]], search_id="done"))
            assert engine.cache is not None
            held = engine.cache.stats.bytes
            freed = engine.end_search("done")
            return held, freed, off.end_search("done")

    held, freed, off = asyncio.run(run())
    assert held > 0 and freed == held and off == 0


def test_a_bundle_without_the_cached_graph_runs_without_a_cache(tiny_bundle: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    from tests.helpers.bundles import edit_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle("qwen-prm"), old)

    def drop(m: dict[str, object]) -> None:
        graph = m["graph"]
        assert isinstance(graph, dict)
        graph["cached_file"] = None
        files = m["files"]
        assert isinstance(files, dict)
        files.pop("model_cached.onnx")

    edit_manifest(old, drop)
    (old / "model_cached.onnx").unlink()

    async def run() -> ScoreResult:
        async with Engine.from_bundle(old, config=_config(64 << 20)) as engine:
            assert engine.cache is None
            return await engine.score(ScoreRequest(PROBLEM, [STEPS[:2]]))

    assert len(asyncio.run(run()).candidates[0].step_scores) == 2


chains = st.lists(st.lists(st.integers(0, len(STEPS) - 1), min_size=1, max_size=5), min_size=1, max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    waves=st.lists(st.lists(chains, min_size=1, max_size=3), min_size=1, max_size=4),
    budget_kb=st.integers(4, 256),
    attention_cost=st.sampled_from([0.0, 10.0]),
)
def test_random_search_traffic_scores_like_from_scratch(
    tiny_bundle: Callable[..., Path], waves: list[list[list[list[int]]]], budget_kb: int, attention_cost: float
) -> None:
    """Random trees of chains over a few steps (they share prefixes often), sent in concurrent waves, with
    budgets small enough to evict at every point: the cached engine's scores equal the uncached one's."""
    bundle = tiny_bundle("qwen-prm")
    requests = [
        [ScoreRequest(PROBLEM, [[STEPS[i] for i in c] for c in cands], search_id=f"s{n % 2}") for n, cands in enumerate(w)]
        for w in waves
    ]
    asyncio.run(_both(bundle, requests, budget_kb << 10, attention_cost))


def test_the_packer_prices_each_base_and_runs_the_cheapest() -> None:
    """Four beams of one search continue four sibling nodes below a long shared trunk. With attention free the
    packer continues each node (fewest tokens); with attention dear it recomputes the beams' short tails in
    rows continuing the trunk, rather than paying four rows the whole past each."""
    from stepscore.runtime.cachedbatch import Suffix, pack_cached
    from stepscore.runtime.packing import PackOptions
    from stepscore.runtime.prefixcache import PrefixCache

    cache = PrefixCache(1 << 30)

    def kv(n: int) -> np.ndarray:
        return np.zeros((1, 2, 1, n, 4), np.float32)

    trunk = np.arange(1, 201, dtype=np.int32)  # one 200-token segment
    cache.insert(cache.root, trunk, np.array([199], np.int32), kv(200), [0.5])
    top = next(iter(cache.root.children.values()))
    leaves = []
    for b in range(4):
        tail = np.array([300 + b, 301, 302, 303], np.int32)
        cache.insert(top, tail, np.array([3], np.int32), kv(4), [0.1])
        leaves.append(top.children[tail.tobytes()])
    items = [
        Suffix(np.array([400 + b, 401], np.int32), np.array([1], np.int32), past=leaves[b], search_id="beam") for b in range(4)
    ]
    cheap = pack_cached(items, cache, PackOptions(attention_cost=0.0))
    assert cheap.item_base == leaves and cheap.shape[0] == 4
    dear = pack_cached(items, cache, PackOptions(attention_cost=0.05))
    assert dear.item_base == [top] * 4 and dear.shape[0] < 4  # the tails packed together
    assert dear.past_len is not None and set(dear.past_len.tolist()) == {200}
    # each item still returns only its own suffix's read, and its tokens are its tail + suffix
    assert [len(r) for r in dear.item_reads] == [1] * 4
    assert dear.item_tokens is not None and all(len(t) == 6 for t in dear.item_tokens)


def test_a_one_step_suffix_is_not_padded_to_a_whole_uncached_chain() -> None:
    """Step-by-step traffic mixes one-step suffixes continuing long cached chains with first calls that
    compute a whole chain. Laid out together, every suffix row is padded to the chain's length; with a run
    overhead to price runs, the oldest item's length class runs now and the rest waits for the next run."""
    from stepscore.runtime.cachedbatch import Suffix, layout_cost, pack_cached
    from stepscore.runtime.packing import PackOptions
    from stepscore.runtime.prefixcache import PrefixCache

    cache = PrefixCache(1 << 30)
    nodes = []
    for k in range(3):  # three solutions, 200 tokens each cached
        chain = np.arange(1, 201, dtype=np.int32) + 1000 * k
        cache.insert(cache.root, chain, np.array([199], np.int32), np.zeros((1, 2, 1, 200, 4), np.float32), [0.5])
        nodes.append(cache.root.children[chain.tobytes()])
    steps = [
        Suffix(np.array([7, 8, 9, 10], np.int32), np.array([3], np.int32), past=nodes[k], search_id=f"s{k}") for k in range(3)
    ]
    first_call = Suffix(np.arange(5000, 5300, dtype=np.int32), np.array([99, 299], np.int32))
    items = [*steps[:2], first_call, steps[2]]
    together = pack_cached(items, cache, PackOptions(attention_cost=1e-3))
    assert together.leftover == [] and together.shape == (4, 304)
    classes = PackOptions(attention_cost=1e-3, run_overhead=20.0, past_padded=False)
    now = pack_cached(items, cache, classes)
    assert now.leftover == [2] and now.shape == (3, 16)  # the three one-step suffixes, in one run of short rows
    assert [len(r) for r in now.item_reads] == [1, 1, 0, 1]
    later = pack_cached([first_call], cache, classes)
    assert later.leftover == [] and later.shape == (1, 304)
    # the cost of a batch counts each row's own past, or the longest for every row when pasts are padded
    assert now.past_len is not None and now.past_len.tolist() == [200, 200, 200]
    mixed = pack_cached([steps[0], first_call], cache, PackOptions(attention_cost=0.0))  # continues each node
    assert mixed.past_len is not None and sorted(mixed.past_len.tolist()) == [0, 200]
    own = layout_cost(mixed, PackOptions(attention_cost=1e-3, past_padded=False))
    padded = layout_cost(mixed, PackOptions(attention_cost=1e-3, past_padded=True))
    assert padded - own == pytest.approx(2.0 * 1e-3 * 304 * 400 - 1e-3 * 304 * 200)


def test_suffix_kv_cuts_an_item_out_of_the_per_layer_outputs_and_only_what_the_cache_lacks() -> None:
    """Two candidates sharing a two-step prefix lie in one tree row. Each one's K/V comes out of the per-layer
    outputs at its own token positions; the second one's insert asks only for its own last segment, the
    shared prefix being cached already by the first."""
    from stepscore.runtime.cachedbatch import Suffix, pack_cached, suffix_kv
    from stepscore.runtime.packing import PackOptions
    from stepscore.runtime.prefixcache import KvArray, PrefixCache

    cache = PrefixCache(1 << 30)
    shared = np.arange(1, 31, dtype=np.int32)  # two segments of 15 tokens
    items = [
        Suffix(np.concatenate([shared, np.array([40 + k] * 4, np.int32)]), np.array([14, 29, 33], np.int32)) for k in range(2)
    ]
    batch = pack_cached(items, cache, PackOptions(row_tokens=64))
    assert batch.shape[0] == 1 and batch.item_tokens is not None  # one tree row: the prefix laid out once
    rows, seq = batch.shape
    layers, heads, dim = 2, 3, 4
    # each value codes (output n, head, position in the row), so that every cut can be checked by hand
    present = [
        np.broadcast_to(
            100_000 * n + 1000 * np.arange(heads)[:, None, None] + np.arange(seq)[None, :, None], (rows, heads, seq, dim)
        ).astype(np.float32)
        for n in range(2 * layers)
    ]
    asked: list[tuple[int, int]] = []
    for k, item in enumerate(items):
        cut = suffix_kv(present, batch, k)
        positions = batch.item_tokens[k] % seq
        whole = cut(0, len(item.ids))
        assert whole is not None and whole.shape == (layers, 2, heads, len(item.ids), dim)
        for n in range(2 * layers):
            np.testing.assert_array_equal(whole[n // 2, n % 2], present[n][0][:, positions])

        def counting(start: int, end: int, cut: Callable[[int, int], KvArray | None] = cut) -> KvArray | None:
            asked.append((start, end))
            return cut(start, end)

        cache.insert(cache.root, item.ids, item.reads, counting, [0.1, 0.2, 0.3 + k])
    assert asked == [(0, 15), (15, 30), (30, 34), (30, 34)]  # the shared segments were copied once
    m = cache.match(items[1])
    np.testing.assert_array_equal(cache.past(m.node), suffix_kv(present, batch, 1)(0, 34))
    cache.release(m.node)


def test_a_queued_suffix_continues_what_batches_before_it_cached() -> None:
    """A candidate queued when the cache held nothing of it runs from the deepest node cached since (the
    first candidates of its request cache the problem it shares): the batch returns the cached scores first,
    then those of its reads, and holds no lock once laid out. Its K/V are inserted from its own node; when the
    deeper node is evicted before that, nothing below the gap is cached, and nothing fails."""
    from stepscore.runtime.cachedbatch import Suffix, pack_cached, suffix_kv
    from stepscore.runtime.packing import PackOptions
    from stepscore.runtime.prefixcache import PrefixCache

    cache = PrefixCache(1 << 30)
    problem = np.arange(1, 21, dtype=np.int32)  # a 20-token segment, read at its last token
    item = Suffix(np.concatenate([problem, np.array([50, 51, 52], np.int32)]), np.array([19, 22], np.int32), past=cache.root)
    cache.insert(cache.root, problem, np.array([19], np.int32), np.zeros((1, 2, 1, 20, 4), np.float32), [0.25])
    batch = pack_cached([item], cache, PackOptions())
    assert batch.past_len is not None and batch.past_len.tolist() == [20]
    assert batch.item_known is not None and batch.item_known[0].tokens == 20
    assert batch.item_known[0].scores.tolist() == [0.25]
    assert [len(r) for r in batch.item_reads] == [1] and batch.shape == (1, 16)  # its own 3 tokens, one read
    assert all(node.refs == 0 for node in [cache.root, *cache.root.children.values()])
    rows, seq = batch.shape
    present = [np.full((rows, 1, seq, 4), float(n), np.float32) for n in range(2)]

    def remember() -> int:  # as the scheduler does for a row that continued a node below the item's own
        kv = suffix_kv(present, batch, 0, skipped=20)
        return cache.insert(cache.root, item.ids, item.reads, kv, [0.25, 0.75])

    assert cache.clear() > 0  # the deeper node is gone before the batch's K/V come back
    assert remember() == 0 and cache.stats.entries == 0
    cache.insert(cache.root, problem, np.array([19], np.int32), np.zeros((1, 2, 1, 20, 4), np.float32), [0.25])
    assert remember() == 1 and cache.stats.entries == 2  # kept: only the segment the batch computed is added
    m = cache.match(item)
    assert m.complete and m.scores == [0.25, 0.75]
    cache.release(m.node)
    cache.check()


def test_the_candidates_of_one_request_in_several_batches_reuse_each_other(tiny_bundle: Callable[..., Path]) -> None:
    """Rows too short for the whole tree: the candidates of one Best-of-N request run in several batches, and
    the later ones continue the problem and first steps the earlier ones cached (nothing was cached when the
    request arrived). Scores equal scoring from scratch; each candidate says how many tokens the cache gave."""
    bundle = tiny_bundle("qwen-prm")
    request = ScoreRequest(PROBLEM, [[*STEPS[:3], STEPS[k]] for k in range(4, 8)])

    async def run() -> tuple[ScoreResult, ScoreResult, int, int]:
        small = dict(row_tokens=64, max_batch_tokens=64, max_queued_tokens=4096)
        async with (
            Engine.from_bundle(bundle, config=_config(0)) as plain,
            Engine.from_bundle(bundle, config=_config(64 << 20, **small)) as cached,
        ):
            want, got = await plain.score(request), await cached.score(request)
            assert cached.cache is not None
            cached.cache.check()
            return want, got, cached.stats.batches, cached.cache.stats.hit_tokens

    want, got, batches, hits = asyncio.run(run())
    assert batches >= 2
    for cw, cg in zip(want.candidates, got.candidates, strict=True):
        np.testing.assert_allclose(cg.step_scores, cw.step_scores, atol=TOL, rtol=0)
    found = [c.cached_tokens for c in got.candidates]
    assert any(n > 0 for n in found) and hits == sum(found)


def test_a_suffix_left_over_is_counted_as_a_hit_once_when_its_batch_runs() -> None:
    """Two suffixes each find their cached problem; only one fits the batch. The hit counts the one laid out;
    the other is counted when the layout that runs it finds its problem again, not in every layout it waits
    through."""
    from stepscore.runtime.cachedbatch import Suffix, pack_cached
    from stepscore.runtime.packing import PackOptions
    from stepscore.runtime.prefixcache import PrefixCache

    cache = PrefixCache(1 << 30)
    items = []
    for k in range(2):
        problem = np.arange(1, 21, dtype=np.int32) + 100 * k
        cache.insert(cache.root, problem, np.array([19], np.int32), np.zeros((1, 2, 1, 20, 4), np.float32), [0.25])
        ids = np.concatenate([problem, np.full(40, 50, np.int32)])
        items.append(Suffix(ids, np.array([19, 59], np.int32), past=cache.root))
    first = pack_cached(items, cache, PackOptions(), max_tokens=48)
    assert first.leftover == [1] and cache.stats.hit_tokens == 20
    again = pack_cached([items[1]], cache, PackOptions(), max_tokens=48)
    assert again.leftover == [] and cache.stats.hit_tokens == 40
