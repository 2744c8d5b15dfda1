"""The prefix cache's tree on its own: matching, the byte budget, locks against eviction, search lifetimes.

K/V arrays here are synthetic: each token's entry holds its own id, so `past(node)` must give back the ids
of the whole path in order, which checks the concatenation the cached graph is fed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepscore.runtime.prefixcache import PrefixCache, segment_ends
from stepscore.runtime.types import Formatted

LAYERS, HEADS, DIM = 2, 1, 2
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4


def chain(steps: list[list[int]]) -> Formatted:
    """A candidate whose segments are `steps` (each step's last token is its read)."""
    ids = np.array([t for s in steps for t in s], dtype=np.int32)
    return Formatted(ids, np.array(np.cumsum([len(s) for s in steps]) - 1, dtype=np.int32))


def fake_kv(ids: np.ndarray) -> np.ndarray:
    kv = np.zeros((LAYERS, 2, HEADS, len(ids), DIM), np.float32)
    kv[...] = ids.astype(np.float32)[None, None, None, :, None]
    return kv


def compute(cache: PrefixCache, item: Formatted, search: str = "") -> list[float]:
    """Score `item` the way the engine does, with a fake model whose score at a read is its token id."""
    m = cache.match(item, search)
    try:
        if m.complete:
            return m.scores
        ids, reads = item.ids[m.tokens :], item.reads[len(m.scores) :] - m.tokens
        past = cache.past(m.node)
        if past is not None:  # the past handed to the graph is exactly the matched tokens
            assert past[0, 0, 0, :, 0].tolist() == item.ids[: m.tokens].tolist()
        new = [float(ids[r]) for r in reads]
        cache.insert(m.node, ids, reads, fake_kv(ids), new, search)
        return m.scores + new
    finally:
        cache.release(m.node)


def test_a_chain_sent_again_with_one_more_step_runs_only_that_step() -> None:
    cache = PrefixCache(1 << 20)
    steps = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    compute(cache, chain(steps[:2]))
    m = cache.match(chain(steps))
    assert m.tokens == 5 and m.scores == [3.0, 5.0] and not m.complete
    cache.release(m.node)
    assert compute(cache, chain(steps)) == [3.0, 5.0, 9.0]
    m = cache.match(chain(steps))
    assert m.complete and m.tokens == 9
    cache.release(m.node)
    assert cache.stats.entries == 3 and cache.stats.bytes == 9 * BYTES_PER_TOKEN
    cache.check()


def test_a_different_step_shares_only_the_common_segments() -> None:
    cache = PrefixCache(1 << 20)
    compute(cache, chain([[1, 2], [3, 4]]))
    m = cache.match(chain([[1, 2], [3, 5]]))  # same first step, another second step
    assert m.tokens == 2 and m.scores == [2.0]
    cache.release(m.node)
    m = cache.match(chain([[1, 2, 3, 4]]))  # the same ids cut elsewhere: a different segment, no hit
    assert m.tokens == 0
    cache.release(m.node)


def test_the_budget_is_never_exceeded_and_a_segment_too_large_is_not_cached() -> None:
    cache = PrefixCache(10 * BYTES_PER_TOKEN)
    compute(cache, chain([[1] * 11]))  # 11 tokens: more than the whole budget
    assert cache.stats.entries == 0 and cache.stats.skipped == 1
    for k in range(20):
        compute(cache, chain([[100 + k, 2, 3]]))
        cache.check()
    assert cache.stats.bytes <= cache.budget_bytes and cache.stats.evictions > 0


def test_a_locked_node_and_its_ancestors_survive_any_pressure() -> None:
    cache = PrefixCache(12 * BYTES_PER_TOKEN)
    steps = [[1, 2, 3], [4, 5, 6]]
    compute(cache, chain(steps))
    held = cache.match(chain(steps))  # a batch is computing below this node
    for k in range(30):
        compute(cache, chain([[200 + k, 7, 8]]))
    assert held.node.kv is not None and held.node.parent is not None and held.node.parent.kv is not None
    past = cache.past(held.node)
    assert past is not None and past[0, 0, 0, :, 0].tolist() == [1, 2, 3, 4, 5, 6]
    # the in-flight suffix can still be inserted below it
    cache.insert(held.node, np.array([9, 10], np.int32), np.array([1], np.int32), fake_kv(np.array([9, 10])), [10.0])
    cache.release(held.node)
    cache.check()


def test_end_search_frees_what_only_that_search_used() -> None:
    cache = PrefixCache(1 << 20)
    shared = [[1, 2], [3, 4]]
    compute(cache, chain(shared), "a")
    compute(cache, chain([*shared, [5, 6]]), "a")
    compute(cache, chain([*shared, [7, 8]]), "b")  # search b reuses a's first two steps
    compute(cache, chain([[9, 9]]))  # anonymous
    freed = cache.end_search("a")
    assert freed == 2 * BYTES_PER_TOKEN  # only [5, 6]: the shared steps are b's too
    m = cache.match(chain([*shared, [7, 8]]), "b")
    assert m.complete
    cache.release(m.node)
    assert cache.end_search("b") == 6 * BYTES_PER_TOKEN
    assert cache.end_search("b") == 0  # idempotent
    assert cache.stats.entries == 1  # the anonymous entry stays until evicted
    cache.check()


def test_live_searches_are_evicted_after_anonymous_entries() -> None:
    cache = PrefixCache(6 * BYTES_PER_TOKEN)
    compute(cache, chain([[1, 2]]), "live")
    compute(cache, chain([[3, 4]]))
    compute(cache, chain([[5, 6]]))
    compute(cache, chain([[7, 8]]))  # needs room: the oldest anonymous entry goes, not the older search's
    m = cache.match(chain([[1, 2]]))
    assert m.complete
    cache.release(m.node)
    m = cache.match(chain([[3, 4]]))
    assert m.tokens == 0
    cache.release(m.node)


def test_release_more_often_than_match_is_a_bug() -> None:
    cache = PrefixCache(1 << 10)
    m = cache.match(chain([[1]]))
    cache.release(m.node)
    with pytest.raises(AssertionError):
        cache.release(m.node)


def test_segments_end_after_each_read() -> None:
    assert segment_ends(np.array([2, 5, 6], np.int32)) == [3, 6, 7]


steps_st = st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(
    chains=st.lists(st.tuples(steps_st, st.sampled_from(["", "s1", "s2"])), min_size=1, max_size=25),
    budget_tokens=st.integers(1, 40),
    ends=st.lists(st.sampled_from(["s1", "s2"]), max_size=3),
    hold=st.integers(0, 24),
)
def test_random_traffic_scores_like_from_scratch_within_budget(
    chains: list[tuple[list[list[int]], str]], budget_tokens: int, ends: list[str], hold: int
) -> None:
    """Random trees of chains (a small alphabet makes them share), random budgets (eviction at every point),
    one node held locked for a while, EndSearch in between: every answer equals the fake model's from-scratch
    scores, the accounting matches the tree and the budget holds after every operation."""
    cache = PrefixCache(budget_tokens * BYTES_PER_TOKEN)
    held = None
    for n, (steps, search) in enumerate(chains):
        item = chain(steps)
        assert compute(cache, item, search) == [float(item.ids[r]) for r in item.reads]
        cache.check()
        if n == hold % len(chains):
            held = cache.match(item, search)
        if n < len(ends):
            cache.end_search(ends[n])
            cache.check()
    if held is not None:
        assert held.node.kv is not None or held.node is cache.root  # never evicted while locked
        cache.release(held.node)
    cache.check()


def test_extend_continues_a_queued_suffix_from_what_was_cached_since_and_leaves_its_last_segment() -> None:
    cache = PrefixCache(1 << 20)
    item = chain([[1, 2], [3, 4, 5], [6]])
    m = cache.match(item)  # queued when nothing was cached: the whole candidate is its suffix
    assert m.tokens == 0 and cache.stats.miss_tokens == 6
    compute(cache, item)  # another candidate (here the same chain) ran meanwhile and cached all three segments
    assert cache.stats.hit_tokens == 0
    deeper = cache.extend(m.node, item)
    # at most two of the three segments: a suffix always keeps something to compute
    assert (deeper.tokens, deeper.scores, deeper.complete) == (5, [2.0, 5.0], False)
    assert deeper.node.refs == 1 and deeper.node.end == 5
    assert (cache.stats.hit_tokens, cache.stats.miss_tokens) == (0, 6 + 6)  # the second 6: compute's own match
    cache.found(deeper.tokens)  # the suffix's batch runs: counted once, however often it was walked
    assert (cache.stats.hit_tokens, cache.stats.miss_tokens) == (5, 6 + 6 - 5)
    cache.release(deeper.node)
    cache.release(m.node)
    # a suffix continuing a node: the walk starts there and counts from its end
    rest = Formatted(item.ids[2:], item.reads[1:] - 2)
    below = cache.extend(cache.root.children[np.array([1, 2], np.int32).tobytes()], rest)
    assert (below.tokens, below.scores) == (3, [5.0])
    cache.release(below.node)
    one_step = cache.extend(cache.root, chain([[1, 2]]))  # one segment: nothing to skip
    assert one_step.node is cache.root and one_step.tokens == 0
    cache.release(one_step.node)
    cache.check()
