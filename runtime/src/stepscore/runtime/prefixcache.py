"""The prefix cache: what the server computed for earlier calls, so that a search call pays only for new steps.

A search calls the scorer once per iteration with the whole chain so far. The cache is a radix tree over
*segments*: a candidate's token ids cut after each read position (its step tags), so that a node is one step
with its tag. Each node holds

- the per-layer K/V of its tokens (array [layers, 2, kv_heads, tokens, head_dim], after the rotary
  embedding at their absolute positions: valid only below the same ancestors, which the tree guarantees), and
- the score read at its last token.

Keys are exact token ids, so a hit is correct whatever the format: with causal attention the K/V and the
score at a position depend only on the ids up to it. A format whose later text changes earlier tokens
(merges across a step boundary) only loses hits; tests/export/test_real_tokenizers.py checks,
per preset with the real tokenizers, that a chain's boundaries survive the next step.

Lifetimes. `match` locks the deepest matched node (its ancestors are inner nodes, never evicted before it)
until `release`; a batch computing a suffix therefore never loses its past. Eviction takes unlocked leaves,
least recently used first, nodes of no live search before those of a live one. `end_search` frees the
nodes only that search used (not those another search or a call without a search id used too). Bytes are
accounted exactly (the K/V arrays) and never exceed the budget: a segment that cannot be made room for is not
cached.

One lock guards the tree: matches and inserts come from the event loop, past assembly from the packing
thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stepscore.runtime.types import Formatted, IntArray

KvArray = npt.NDArray[np.generic]  # [layers, 2, kv_heads, tokens, head_dim], the graph's dtype
# A suffix's K/V as `insert` takes it: the array, or a function returning its tokens [start, end) as one
# (stepscore.runtime.cachedbatch.suffix_kv cuts them out of a batch's outputs only for segments not cached yet),
# or None for tokens the batch did not compute (they were cached when it was laid out, and evicted since).
KvSource = KvArray | Callable[[int, int], KvArray | None]


@dataclass(eq=False)
class Node:
    """One cached segment. Identity-compared: the tree holds each node once."""

    ids: IntArray
    parent: Node | None
    start: int  # tokens before this segment (its first token's position)
    kv: KvArray | None = None  # None only for the root
    score: float = 0.0
    children: dict[bytes, Node] = field(default_factory=dict)
    refs: int = 0
    searches: set[str] = field(default_factory=set)  # the live searches that used it
    anonymous: bool = False  # a call without a search id used it: no end_search frees it

    @property
    def end(self) -> int:
        return self.start + int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else int(self.kv.nbytes)


@dataclass
class Match:
    """What the cache holds of one candidate: `node` (locked until released) and the scores up to it."""

    node: Node  # the deepest matched node (the root when nothing matched)
    tokens: int  # the candidate's tokens it covers
    scores: list[float]  # the scores of the reads it covers, in order
    complete: bool  # every read is covered: nothing to compute


@dataclass
class CacheStats:
    hit_tokens: int = 0  # candidate tokens answered from the cache
    miss_tokens: int = 0  # candidate tokens that had to run
    bytes: int = 0  # K/V bytes held
    entries: int = 0  # nodes held
    evictions: int = 0  # nodes evicted to make room (not counting end_search)
    freed_by_end_search: int = 0
    skipped: int = 0  # segments not cached: no room even after eviction


def _key(ids: IntArray) -> bytes:
    return np.ascontiguousarray(ids, dtype=np.int32).tobytes()


def segment_ends(reads: IntArray) -> list[int]:
    """Where a candidate's segments end: one past each read position."""
    return [int(r) + 1 for r in reads]


class PrefixCache:
    """A radix tree of step segments with their K/V and scores, within `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError("the prefix cache needs a positive budget (0 turns it off: do not create one)")
        self.budget_bytes = budget_bytes
        self.root = Node(np.empty(0, np.int32), None, 0)
        self.stats = CacheStats()
        self._lru: OrderedDict[Node, None] = OrderedDict()  # every node but the root, least recent first
        self._by_search: dict[str, set[Node]] = {}
        self._lock = threading.Lock()

    # -- lookups --------------------------------------------------------------------------------

    def match(self, item: Formatted, search_id: str = "") -> Match:
        """The longest run of `item`'s segments the cache holds; the deepest matched node is locked."""
        with self._lock:
            m = self._walk(self.root, item.ids, item.reads, len(item.reads), search_id)
            self.stats.hit_tokens += m.tokens
            self.stats.miss_tokens += item.num_tokens - m.tokens
            return m

    def extend(self, node: Node, item: Formatted, search_id: str = "") -> Match:
        """What the cache holds now of `item`, a suffix continuing `node` (locked by the caller), leaving at
        least its last segment to compute. A suffix matched when it was queued may find more once batches
        before it have run (the other candidates of its request: the problem they share). The node reached
        is locked (`release` it); tokens and scores count from the end of `node`. The statistics do not
        change: a suffix may be walked again in each layout it is left over from (`found` counts it once)."""
        with self._lock:
            return self._walk(node, item.ids, item.reads, len(item.reads) - 1, search_id)

    def found(self, tokens: int) -> None:
        """Count `tokens` that `extend` found for suffixes in a batch as hits (they counted as misses when the
        suffixes were matched)."""
        with self._lock:
            self.stats.hit_tokens += tokens
            self.stats.miss_tokens -= tokens

    def _walk(self, node: Node, ids: IntArray, reads: IntArray, most: int, search_id: str) -> Match:
        """Down from `node` along the segments of (`ids`, `reads`), at most `most` of them; locks the last
        node reached (lock held)."""
        scores: list[float] = []
        start = 0
        for end in segment_ends(reads[: max(0, most)]):
            child = node.children.get(_key(ids[start:end]))
            if child is None:
                break
            node, start = child, end
            scores.append(child.score)
            self._touch(child, search_id)
        node.refs += 1
        return Match(node, start, scores, complete=len(scores) == len(reads))

    def release(self, node: Node) -> None:
        with self._lock:
            assert node.refs > 0, "released more often than matched"
            node.refs -= 1

    def past(self, node: Node) -> KvArray | None:
        """The K/V of every token from the root to `node` (locked by the caller), [layers, 2, kv, P, D]."""
        with self._lock:
            chain: list[KvArray] = []
            while node.kv is not None:
                chain.append(node.kv)
                assert node.parent is not None
                node = node.parent
        if not chain:
            return None
        return np.concatenate(chain[::-1], axis=3)

    def path(self, node: Node) -> tuple[IntArray, IntArray, list[float]]:
        """The ids from the root to `node` (locked by the caller), the read positions in them and their scores."""
        with self._lock:
            chain: list[Node] = []
            while node.kv is not None:
                chain.append(node)
                assert node.parent is not None
                node = node.parent
        chain.reverse()
        ids = np.concatenate([n.ids for n in chain]) if chain else np.empty(0, np.int32)
        reads = np.array([n.end - 1 for n in chain], dtype=np.int32)
        return ids.astype(np.int32), reads, [n.score for n in chain]

    def common_ancestor(self, nodes: Sequence[Node]) -> Node:
        """The deepest node every one of `nodes` (locked by the caller) is or descends from (the root at worst)."""
        with self._lock:

            def chain(node: Node) -> list[Node]:
                out = [node]
                while out[-1].parent is not None:
                    out.append(out[-1].parent)
                return out[::-1]  # root first

            chains = [chain(n) for n in nodes]
            common = self.root
            for level in zip(*chains, strict=False):
                if any(n is not level[0] for n in level):
                    break
                common = level[0]
            return common

    # -- inserts --------------------------------------------------------------------------------

    def insert(
        self, parent: Node, ids: IntArray, reads: IntArray, kv: KvSource, scores: Sequence[float], search_id: str = ""
    ) -> int:
        """Cache the segments of a suffix computed below `parent` (locked by the caller): `ids` and `reads`
        relative to the suffix, `kv` its K/V [layers, 2, kv, len(ids), D] (or a function of a token range
        returning that range's, asked only for the segments not cached yet, None where it has none: the
        segments from there on are not cached), `scores` its reads' scores. Returns the number of segments
        added."""
        added, start = 0, 0
        with self._lock:
            node = parent
            for end, score in zip(segment_ends(reads), scores, strict=True):
                key = _key(ids[start:end])
                child = node.children.get(key)
                if child is None:
                    segment_kv = kv(start, end) if callable(kv) else np.ascontiguousarray(kv[:, :, :, start:end])
                    if segment_kv is None:
                        break
                    if not self._make_room(int(segment_kv.nbytes), keep=node):
                        self.stats.skipped += 1
                        break
                    child = Node(np.array(ids[start:end], dtype=np.int32), node, node.end, segment_kv, float(score))
                    node.children[key] = child
                    self.stats.bytes += child.nbytes
                    self.stats.entries += 1
                    added += 1
                self._touch(child, search_id)
                node, start = child, end
        return added

    # -- search lifetimes -----------------------------------------------------------------------

    def end_search(self, search_id: str) -> int:
        """Forget `search_id`; free the nodes no other search uses and no batch holds. Returns bytes freed."""
        freed = 0
        with self._lock:
            nodes = self._by_search.pop(search_id, set())
            for node in nodes:
                node.searches.discard(search_id)
            # deepest first, so that a parent left childless by its children's removal can go too
            for node in sorted(nodes, key=lambda n: -n.end):
                if not (node.searches or node.anonymous or node.children or node.refs) and node.kv is not None:
                    freed += self._remove(node)
                    self.stats.freed_by_end_search += 1
        return freed

    def clear(self) -> int:
        """Drop every entry no batch holds (benchmarks start each measurement cold). Returns bytes freed."""
        freed = 0
        with self._lock:
            for node in sorted(self._lru, key=lambda n: -n.end):  # children before their parents
                if not node.children and node.refs == 0:
                    freed += self._remove(node)
        return freed

    def live_searches(self) -> int:
        with self._lock:
            return len(self._by_search)

    # -- internals (lock held) ------------------------------------------------------------------

    def _touch(self, node: Node, search_id: str) -> None:
        self._lru[node] = None
        self._lru.move_to_end(node)
        if search_id:
            node.searches.add(search_id)
            self._by_search.setdefault(search_id, set()).add(node)
        else:
            node.anonymous = True

    def _make_room(self, nbytes: int, keep: Node) -> bool:
        """Evict unlocked leaves (anonymous before live searches', least recently used first) until `nbytes`
        fit; never `keep` (the insert's parent) or its ancestors."""
        if nbytes > self.budget_bytes:
            return False
        protected = set()
        n: Node | None = keep
        while n is not None:
            protected.add(n)
            n = n.parent
        for live_ok in (False, True):
            while self.stats.bytes + nbytes > self.budget_bytes:
                victim = next(
                    (
                        c
                        for c in self._lru
                        if not c.children and c.refs == 0 and c not in protected and (live_ok or not c.searches)
                    ),
                    None,
                )
                if victim is None:
                    break
                self._remove(victim)
                self.stats.evictions += 1
        return self.stats.bytes + nbytes <= self.budget_bytes

    def _remove(self, node: Node) -> int:
        assert node.parent is not None and not node.children and node.refs == 0
        del node.parent.children[_key(node.ids)]
        self._lru.pop(node, None)
        for sid in node.searches:
            held = self._by_search.get(sid)
            if held is not None:
                held.discard(node)
                if not held:
                    del self._by_search[sid]
        freed = node.nbytes
        self.stats.bytes -= freed
        self.stats.entries -= 1
        node.kv = None
        return freed

    def check(self) -> None:
        """Assert the invariants (tests): bytes and entries match the tree, within budget, refs >= 0."""
        with self._lock:
            total, count, stack = 0, 0, list(self.root.children.values())
            while stack:
                node = stack.pop()
                assert node.refs >= 0 and node.kv is not None
                assert node.parent is not None and node.parent.children.get(_key(node.ids)) is node
                total += node.nbytes
                count += 1
                stack.extend(node.children.values())
            assert total == self.stats.bytes, (total, self.stats.bytes)
            assert count == self.stats.entries == len(self._lru)
            assert total <= self.budget_bytes
