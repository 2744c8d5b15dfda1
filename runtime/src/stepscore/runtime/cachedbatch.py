"""Batches for the cached graph: each candidate's uncached suffix, continuing the K/V the prefix cache holds.

The engine matches every candidate against the prefix cache (stepscore.runtime.prefixcache) and queues only
what is left: a `Suffix`, whose ids and reads are relative to the end of its matched node. `pack_cached`
groups suffixes by that node (one past per row), lays each group out with the ordinary packer (so
candidates forking from one cached node still share their common tokens in one tree row), and stacks the
groups into one batch: positions shifted by the past's length, the pasts padded to the longest and masked
by `past_len`. After the run, `suffix_kv` cuts each suffix's K/V out of the batch's present outputs for
the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from stepscore.runtime.backend import KvBackend, Present
from stepscore.runtime.packing import Known, PackedBatch, PackOptions, pack
from stepscore.runtime.prefixcache import KvArray, Node, PrefixCache
from stepscore.runtime.types import Formatted


@dataclass(frozen=True)
class Suffix(Formatted):
    """The part of a candidate the cache did not hold: `ids`/`reads` start after `past` (a locked node;
    the root when nothing matched). `cacheable` is False for candidates whose positions were shifted by
    left truncation: they run from position 0 and their K/V are not kept."""

    past: Node | None = None
    search_id: str = ""
    cacheable: bool = True

    @property
    def start(self) -> int:
        return 0 if self.past is None else self.past.end


# What a past token costs a new token of its row, relative to attention to another new token. The
# MultiHeadAttention graph repeats grouped K/V per query head and concatenates past and new K/V per layer:
# about twice (CPU EP, benchmark model, 32 rows x 64 new tokens: a past of 1,200 tokens took the run from
# 0.59 s to 1.30 s). GroupQueryAttention reads them as they are: about the same (8 rows x 64 new tokens, one
# thread: a past of 1,200 added 92 ms to 89 ms, 150 ns a token pair, as among the new tokens).
PAST_ATTENTION_WEIGHT = {True: 2.0, False: 1.0}  # by PackOptions.past_padded


def _rows_cost(rows: int, seq: int, past_tokens: float, options: PackOptions) -> float:
    """`rows` rows of `seq` new tokens attending to `past_tokens` past tokens in all (summed over the rows)."""
    ac = options.attention_cost
    return rows * seq * (1.0 + ac * seq) + PAST_ATTENTION_WEIGHT[options.past_padded] * ac * seq * past_tokens


def layout_cost(batch: PackedBatch, options: PackOptions) -> float:
    """The packer's cost of a cached-graph batch: rows x length, attention to the row and to the past (each
    row's own, or the longest for every row when pasts are padded)."""
    rows, seq = batch.shape
    pasts = batch.past_len if batch.past_len is not None and rows else np.zeros(rows, np.int64)
    past = float(rows * pasts.max()) if options.past_padded and rows else float(pasts.sum())
    return _rows_cost(rows, seq, past, options)


def pack_cached(
    items: Sequence[Suffix], cache: PrefixCache, options: PackOptions, max_tokens: int | None = None, pad_id: int = 0
) -> PackedBatch:
    """Lay out suffixes for the cached graph (see the module doc). Groups past `max_tokens` (rows x row
    length; at least one group is kept) are left over.

    Each row continues one cached node, its *base*. The obvious base is each suffix's own matched node, but
    rows then multiply (one per node) and every row pays for the longest past. Two other layouts are priced
    too, and the cheapest runs: for each search, the deepest node all its suffixes descend from (beam
    search's kept beams share their problem and first steps: one row per search, the beams' own tails
    recomputed inside it), and the root (everything from scratch, shared inside the batch as the tree graph
    would). Recomputed segments are cached again as they are (they exist already: nothing is added).

    Before any of that, each suffix is matched again from its node (`PrefixCache.extend`): batches that ran
    since it was queued may have cached more of it (a Best-of-N request's first candidates cache the problem
    its other candidates share), and then its row continues that deeper node. The batch's `item_known` holds
    the scores found so."""
    if not items:
        raise ValueError("pack_cached() needs at least one item")
    locked: list[Node] = []
    try:
        deeper, known = _extended(items, cache, locked)
        batch = _pack_cheapest(deeper, cache, options, max_tokens, pad_id)
        # the pasts are copied here: the batch needs none of the deeper nodes after this (`remember` inserts
        # from each item's own node, locked by its request)
        left = set(batch.leftover)  # walked again when laid out next: counted then
        found = sum(k.tokens for i, k in enumerate(known) if i not in left)
        cache.found(found)
        # nothing found (most batches): no scores to put in front, the scheduler passes the values as they are
        return replace(_with_pasts(batch, cache), item_known=known if found else None)
    finally:
        for node in locked:
            cache.release(node)


def _extended(items: Sequence[Suffix], cache: PrefixCache, locked: list[Node]) -> tuple[list[Suffix], list[Known]]:
    """Each item continued from the deepest node the cache holds of it now, and what that skips; the nodes
    reached are appended to `locked` (the caller releases them)."""
    out: list[Suffix] = []
    known: list[Known] = []
    for item in items:
        if item.past is None or not item.cacheable:
            out.append(item)
            known.append(Known(0, np.empty(0, np.float32)))
            continue
        m = cache.extend(item.past, item, item.search_id)
        locked.append(m.node)
        skipped = len(m.scores)
        if skipped:
            rest = (item.reads[skipped:] - m.tokens).astype(np.int32)
            item = replace(item, ids=item.ids[m.tokens :], reads=rest, past=m.node)
        out.append(item)
        known.append(Known(m.tokens, np.asarray(m.scores, dtype=np.float32)))
    return out, known


def _pack_cheapest(
    items: Sequence[Suffix], cache: PrefixCache, options: PackOptions, max_tokens: int | None, pad_id: int
) -> PackedBatch:
    """The cheapest of the layouts pack_cached prices, pasts not copied yet."""
    tree_only = replace(options, plain_cost=None)  # the cached graph is a tree graph
    best = _pack_from(items, [item.past for item in items], cache, tree_only, max_tokens, pad_id)
    if options.attention_cost <= 0 or all(item.start == 0 for item in items):
        return best
    left = set(best.leftover)
    kept = [i for i in range(len(items)) if i not in left]
    chosen = [items[i] for i in kept]
    whole = replace(tree_only, run_overhead=None)  # the items to run now are chosen already
    for bases in (_search_bases(chosen, cache), [cache.root if item.past is not None else None for item in chosen]):
        other = _pack_from(chosen, bases, cache, whole, None, pad_id)
        if layout_cost(other, options) < layout_cost(best, options):
            best = _widen(other, kept, len(items), best.leftover)
    return best  # only the layout that runs copies its pasts


def _with_pasts(batch: PackedBatch, cache: PrefixCache) -> PackedBatch:
    """The batch with its rows' pasts: each row continues the base of the items laid out in it."""
    assert batch.item_tokens is not None and batch.item_base is not None
    _, seq = batch.shape
    row_base: dict[int, Node | None] = {}
    for tokens, base in zip(batch.item_tokens, batch.item_base, strict=True):
        if tokens.size:  # a left-over item has no tokens in the batch
            row_base[int(tokens[0]) // seq] = base
    pasts = [(slice(r, r + 1), cache.past(base) if base is not None else None) for r, base in sorted(row_base.items())]
    return replace(batch, past_kv=_stack_pasts(pasts, batch.shape[0]))


def _search_bases(items: Sequence[Suffix], cache: PrefixCache) -> list[Node | None]:
    """Per item: the deepest node every suffix of its search (anonymous: its own node) descends from."""
    by_search: dict[str, list[Node]] = {}
    for item in items:
        if item.search_id and item.past is not None:
            by_search.setdefault(item.search_id, []).append(item.past)
    common = {sid: cache.common_ancestor(nodes) for sid, nodes in by_search.items()}
    return [common[item.search_id] if item.search_id and item.past is not None else item.past for item in items]


def _widen(batch: PackedBatch, kept: Sequence[int], n: int, leftover: list[int]) -> PackedBatch:
    """A batch laid out for items[kept], re-indexed to all n items (the others left over)."""
    reads: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * n
    tokens: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * n
    bases: list[Node | None] = [None] * n
    assert batch.item_tokens is not None and batch.item_base is not None
    for k, i in enumerate(kept):
        reads[i], tokens[i], bases[i] = batch.item_reads[k], batch.item_tokens[k], batch.item_base[k]
    return replace(batch, item_reads=reads, item_tokens=tokens, item_base=bases, leftover=leftover)


def relative(item: Suffix, base: Node | None, cache: PrefixCache) -> tuple[Formatted, int, list[float]]:
    """`item` laid out from `base` (an ancestor of its node): its ids and reads from the end of `base`, how
    many of those reads the cache holds already, and their scores."""
    if base is None or base is item.past:
        return item, 0, []
    assert item.past is not None
    ids, reads, scores = cache.path(item.past)
    cut = base.end
    held = [k for k in range(len(reads)) if reads[k] >= cut]
    rel_ids = np.concatenate([ids[cut:], item.ids]).astype(np.int32)
    rel_reads = np.concatenate([reads[held] - cut, item.reads + (item.start - cut)]).astype(np.int32)
    return Formatted(rel_ids, rel_reads), len(held), [scores[k] for k in held]


def _pack_from(
    items: Sequence[Suffix],
    bases: Sequence[Node | None],
    cache: PrefixCache,
    tree_only: PackOptions,
    max_tokens: int | None,
    pad_id: int,
) -> PackedBatch:
    """Rows continuing `bases[i]` for item i, one base per row (items of one base share their common tokens
    in tree rows); each item returns the reads of its own suffix only. `past_len` is set, the pasts themselves
    are not (_with_pasts copies them, for the layout chosen only)."""
    groups: dict[int, list[int]] = {}  # in order of first appearance: item 0's group first
    for i, base in enumerate(bases):
        groups.setdefault(id(base), []).append(i)
    laid = [relative(item, base, cache) for item, base in zip(items, bases, strict=True)]
    leftover: list[int] = []
    laid_out: list[tuple[list[int], PackedBatch]] = []
    for group in groups.values():
        sub = pack([laid[i][0] for i in group], tree_only, None, pad_id)
        # a group of mixed lengths may run one length class now (PackOptions.run_overhead): the rest waits
        leftover.extend(group[j] for j in sub.leftover)
        left = set(sub.leftover)
        laid_out.append(([i if j not in left else -1 for j, i in enumerate(group)], sub))
    if tree_only.run_overhead is not None and len(laid_out) > 1:
        pasts = [_end(bases[group_start(members)]) for members, _ in laid_out]
        now = _head_class([sub.shape for _, sub in laid_out], pasts, tree_only)
        leftover.extend(i for k, (members, _) in enumerate(laid_out) if k not in now for i in members if i >= 0)
        laid_out = [laid_out[k] for k in sorted(now)]
    subs: list[tuple[list[int], PackedBatch]] = []
    rows = seq = 0
    for members, sub in laid_out:
        b, s = sub.shape
        longer = max(seq, s)
        if subs and max_tokens is not None and (rows + b) * longer > max_tokens:
            leftover.extend(i for i in members if i >= 0)
            continue
        subs.append((members, sub))
        rows, seq = rows + b, longer
    k = max(sub.step_positions.shape[1] for _, sub in subs)
    input_ids = np.full((rows, seq), pad_id, dtype=np.int64)
    position_ids = np.zeros((rows, seq), dtype=np.int64)
    attn_end = np.tile(np.arange(1, seq + 1, dtype=np.int64), (rows, 1))  # padding sees only itself
    step_positions = np.zeros((rows, k), dtype=np.int64)
    past_len = np.zeros(rows, dtype=np.int64)
    item_reads: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * len(items)
    item_tokens: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * len(items)
    r0 = 0
    for members, sub in subs:
        b, s = sub.shape
        kk = sub.step_positions.shape[1]
        base = bases[group_start(members)]
        start = 0 if base is None else base.end
        rs = slice(r0, r0 + b)
        input_ids[rs, :s] = sub.input_ids
        position_ids[rs, :s] = sub.position_ids + start
        attn_end[rs, :s] = sub.attn_end
        step_positions[rs, :kk] = sub.step_positions
        past_len[rs] = start
        assert sub.item_tokens is not None
        for j, i in enumerate(members):
            if i < 0:
                continue
            reads = sub.item_reads[j][laid[i][1] :]  # the reads the cache holds already are not returned
            item_reads[i] = ((r0 + reads // kk) * k + reads % kk).astype(np.intp)
            toks = sub.item_tokens[j]
            item_tokens[i] = ((r0 + toks // s) * seq + toks % s).astype(np.intp)
        r0 += b
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attn_end=attn_end,
        step_positions=step_positions,
        item_reads=item_reads,
        tokens_submitted=sum(sub.tokens_submitted for _, sub in subs),
        tokens_used=sum(sub.tokens_used for _, sub in subs),
        reads_computed=sum(sub.reads_computed for _, sub in subs),
        leftover=sorted(leftover),
        item_tokens=item_tokens,
        past_len=past_len,
        item_base=list(bases),
    )


def _head_class(shapes: Sequence[tuple[int, int]], pasts: Sequence[int], options: PackOptions) -> set[int]:
    """The groups to run now: the length class of group 0 (the one holding the oldest item) in a partition of
    the groups, sorted by row length, into contiguous classes of least estimated cost (one run each: its
    overhead, every row padded to the class's longest, attention to the pasts). The rest waits for the next
    run. Without it a one-step suffix would be padded to the length of another row's whole uncached chain."""
    assert options.run_overhead is not None
    by_len = sorted(range(len(shapes)), key=lambda g: -shapes[g][1])
    n = len(by_len)
    best = [0.0] + [math.inf] * n  # best[i]: least cost of the i longest groups
    cut = [0] * (n + 1)  # where the last class of that partition starts
    for i in range(1, n + 1):
        rows = 0
        past = longest_past = 0.0
        for j in range(i - 1, -1, -1):  # the class by_len[j:i], its longest row first
            b, _ = shapes[by_len[j]]
            rows += b
            past += b * pasts[by_len[j]]
            longest_past = max(longest_past, pasts[by_len[j]])
            seq = shapes[by_len[j]][1]
            cost = _rows_cost(rows, seq, rows * longest_past if options.past_padded else past, options)
            cost += best[j] + options.run_overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    head = by_len.index(0)
    end = n
    while cut[end] > head:
        end = cut[end]
    return set(by_len[cut[end] : end])


def _end(node: Node | None) -> int:
    return 0 if node is None else node.end


def group_start(members: Sequence[int]) -> int:
    """The first item of a group that runs now (-1 marks an item left over)."""
    return next(i for i in members if i >= 0)


def _stack_pasts(pasts: Sequence[tuple[slice, KvArray | None]], rows: int) -> KvArray | None:
    """[layers, 2, B, kv_heads, P, D], each row's past at its start and zeros after it; None when no row has
    a past (the backend then feeds empty pasts)."""
    known = [kv for _, kv in pasts if kv is not None]
    if not known:
        return None
    layers, two, heads, _, dim = known[0].shape
    longest = max(kv.shape[3] for kv in known)
    out = np.zeros((layers, two, rows, heads, longest, dim), dtype=known[0].dtype)
    for rs, kv in pasts:
        if kv is not None:
            out[:, :, rs, :, : kv.shape[3]] = kv[:, :, None]
    return out


def suffix_kv(present: Present, batch: PackedBatch, index: int, skipped: int = 0) -> Callable[[int, int], KvArray | None]:
    """Item `index`'s K/V as the prefix cache takes it (PrefixCache.insert): a function of a token range of
    the item (counted from the end of its base, or `skipped` tokens before it when the row continued a node
    that deep below the item's own: those it did not compute, and returns None for) returning [layers, 2,
    kv_heads, end - start, D], cut out of the batch's per-layer outputs [B, kv_heads, S, D]. Only the
    segments the cache does not hold are asked for: candidates sharing a prefix in one tree row copy it once,
    not once each."""
    assert batch.item_tokens is not None
    _, s = batch.shape
    flat = batch.item_tokens[index]
    row = int(flat[0]) // s
    cols = flat - row * s
    layers = len(present) // 2

    def cut(start: int, end: int) -> KvArray | None:
        if start < skipped:
            return None
        start, end = start - skipped, end - skipped
        first = present[0]
        out = np.empty((layers, 2, first.shape[1], end - start, first.shape[3]), dtype=first.dtype)
        for n, array in enumerate(present):
            # mode="clip": the indices are in range, and the default ("raise") would copy through a buffer
            np.take(array[row], cols[start:end], axis=1, out=out[n // 2, n % 2], mode="clip")
        return out

    return cut


def empty_past(layers: int, heads: int, dim: int, rows: int, dtype: npt.DTypeLike) -> KvArray:
    """The past of a batch where no row continues a cached prefix: zero tokens."""
    return np.zeros((layers, 2, rows, heads, 0, dim), dtype=dtype)


def score_in_increments(
    backend: KvBackend, cache: PrefixCache, item: Formatted, cuts: Sequence[int], options: PackOptions | None = None
) -> npt.NDArray[np.float32]:
    """Score `item` as a search would send it: its first `cuts[0]` steps, then the first `cuts[1]`, ...
    (ending with all of them), each call through the cache. Returns the last call's scores. Export's
    validation and the tests compare them with scoring the whole chain at once."""
    scores: npt.NDArray[np.float32] = np.empty(0, np.float32)
    for cut in [*cuts, int(item.reads.shape[0])]:
        prefix = Formatted(item.ids[: int(item.reads[cut - 1]) + 1], item.reads[:cut])
        m = cache.match(prefix)
        try:
            held = np.asarray(m.scores, dtype=np.float32)
            if m.complete:
                scores = held
                continue
            suffix = Suffix(prefix.ids[m.tokens :], (prefix.reads[len(m.scores) :] - m.tokens).astype(np.int32), past=m.node)
            batch = pack_cached([suffix], cache, options or PackOptions())
            out, present = backend.run_cached(batch)
            new = out.reshape(-1)[batch.item_reads[0]]
            cache.insert(m.node, suffix.ids, suffix.reads, suffix_kv(present, batch, 0), [float(x) for x in new])
            scores = np.concatenate([held, new])
        finally:
            cache.release(m.node)
    return scores
