"""Packing: candidates -> rows of the graph's batch, sharing prefixes and filling rows.

The layout in a row is the depth-first order of a token trie. Sorting the candidates' token sequences
lexicographically gives that order directly, and the longest common prefix (LCP) of neighbours says how
many tokens each candidate adds: candidate i contributes `ids[lcp_i:]`, placed right after its
predecessor's tokens. Every token then gets:

- `position_ids`: its depth (the position it has when its candidate is scored alone), and
- `attn_end`: the end of its subtree in the row. Token i sees token j iff j <= i < attn_end[j], which is
  exactly "j is an ancestor of i, or i itself" in the tree.

so each candidate's scores equal scoring it alone (tests/runtime/test_packing.py checks this on random
trees). Steps inside a shared prefix are read once and the score is given to every candidate.

Rows: sorted candidates are cut into groups that share at least `min_shared` tokens with their
neighbour; a group larger than a row is split cleanly (the next piece repeats the prefix it needs); the
pieces are then placed first-fit-decreasing into rows, several independent pieces per row, so rows are
packed instead of padded to the longest candidate.

When the bundle has a plain-row graph (no attention bias; flash attention on CUDA) and its cost estimate
for one-sequence-per-row padding beats the best tree layout, the batch is laid out that way instead.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from stepscore.runtime.types import Formatted

I64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PackOptions:
    share_prefixes: bool = True
    pack_rows: bool = True
    row_tokens: int = 2048  # longest row a shared tree may fill; a longer candidate gets a row of its own
    row_multiple: int = 16  # the row length S is rounded up to a multiple of this
    min_shared: int = 8  # neighbours sharing fewer tokens are not kept in the same tree
    # Attention's cost per token per unit of row length, relative to the rest of a layer's per-token
    # cost (about 2 * hidden / parameters per layer): it decides how long a tree row may grow before
    # sharing costs more than it saves. 0: always share as much as row_tokens allows.
    attention_cost: float = 0.0
    # Cost of a token in the plain-row graph (one sequence per row, no attention bias: flash attention on
    # CUDA) relative to the tree graph; the plain layout is used when its cost is lower than the best
    # tree layout's. None: no plain graph, or plain rows are off.
    plain_cost: float | None = None
    # A run's fixed cost, in tokens. When set, a batch whose candidates differ widely in length is split
    # into length classes and only the class holding the oldest candidate runs now (the rest is left
    # over for the next run): one rectangular run would pad the short ones or pack them into long rows,
    # where attention costs every token the whole row. None: one run for the whole batch.
    run_overhead: float | None = None
    # How the cached graph (stepscore.runtime.cachedbatch) attends to the prefix cache's K/V: True when every
    # row pays for the longest past of its batch (MultiHeadAttention: pasts padded to one length and masked),
    # False when each row reads only its own past (GroupQueryAttention with per-row lengths).
    past_padded: bool = True


@dataclass(frozen=True)
class Known:
    """Of an item of a cached-graph batch: the tokens and read scores the cache answered beyond its own past."""

    tokens: int
    scores: npt.NDArray[np.float32]


@dataclass(frozen=True)
class PackedBatch:
    """The engine's tensors for one run, plus where each item's step scores land."""

    input_ids: I64Array  # [B, S]
    position_ids: I64Array  # [B, S]
    attn_end: I64Array  # [B, S]
    step_positions: I64Array  # [B, K]
    item_reads: list[npt.NDArray[np.intp]]  # per item: flat indices into the [B * K] output
    tokens_submitted: int  # sum of the items' lengths
    tokens_used: int  # tokens laid out in rows (after sharing)
    reads_computed: int  # distinct step positions read
    leftover: list[int]  # items that did not fit `max_tokens`; the scheduler queues them again
    # Set for a plain-row batch (one sequence per row from position 0): the rows' lengths, for the plain
    # graph. Such a batch is also a valid tree batch (position_ids and attn_end are filled too).
    seq_lens: I64Array | None = None
    # per item: flat indices into the [B * S] tokens of each of its tokens, in order (the prefix cache reads
    # the item's K/V there)
    item_tokens: list[npt.NDArray[np.intp]] | None = None
    # Set for a batch of the cached graph (stepscore.runtime.cachedbatch): how many cached tokens each row
    # continues, and their K/V [layers, 2, B, kv_heads, P, head_dim] (rows padded to the longest past).
    past_len: I64Array | None = None
    past_kv: npt.NDArray[np.generic] | None = None
    # Per item of a cached-graph batch: the cached node its row continues (stepscore.runtime.prefixcache.Node;
    # None: no past). The item's tokens in the batch start at that node's end.
    item_base: list[Any] | None = None
    # Per item of a cached-graph batch: what the cache held beyond the item's own past when the batch was laid
    # out (its row continues a deeper node: PrefixCache.extend). Those scores come first in the item's scores,
    # before those its reads give.
    item_known: list[Known] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        b, s = self.input_ids.shape
        return int(b), int(s)

    @property
    def tokens_computed(self) -> int:
        b, s = self.shape
        return b * s

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens_used / max(1, self.tokens_computed)


def _key(ids: npt.NDArray[np.int32]) -> bytes:
    # Big-endian unsigned bytes sort in the same order as the token sequences.
    return ids.astype(">u4").tobytes()


def lcp(a: npt.NDArray[np.int32], b: npt.NDArray[np.int32]) -> int:
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    diff = a[:n] != b[:n]
    return int(np.argmax(diff)) if diff.any() else n


class SharedTokenCounter:
    """Counts the tokens a set of sequences occupies once prefixes are shared, incrementally.

    The scheduler uses it to fill a batch up to its token budget: adding x to a sorted set adds
    `len(x) - max(lcp(pred, x), lcp(x, succ))` tokens (prefixes shorter than `min_shared` are not
    shared, as in `pack`).
    """

    def __init__(self, share: bool, min_shared: int = 1) -> None:
        self.share = share
        self.min_shared = min_shared
        self.total = 0
        self._keys: list[bytes] = []
        self._seqs: list[npt.NDArray[np.int32]] = []

    def _locate(self, ids: npt.NDArray[np.int32]) -> tuple[int, bytes, int]:
        key = _key(ids)
        at = bisect.bisect_left(self._keys, key)
        shared = 0
        if at > 0:
            shared = lcp(self._seqs[at - 1], ids)
        if at < len(self._keys):
            shared = max(shared, lcp(ids, self._seqs[at]))
        return at, key, shared if shared >= self.min_shared else 0

    def cost(self, ids: npt.NDArray[np.int32]) -> int:
        """Tokens `ids` would add."""
        if not self.share:
            return int(ids.shape[0])
        return int(ids.shape[0]) - self._locate(ids)[2]

    def add(self, ids: npt.NDArray[np.int32]) -> int:
        """Add `ids`; returns the tokens it added."""
        if not self.share:
            new = int(ids.shape[0])
        else:
            at, key, shared = self._locate(ids)
            self._keys.insert(at, key)
            self._seqs.insert(at, ids)
            new = int(ids.shape[0]) - shared
        self.total += new
        return new


def _sorted_with_lcps(items: Sequence[Formatted], share: bool) -> tuple[list[int], list[int]]:
    """Item order (lexicographic by tokens when sharing: the depth-first order of their trie) and each
    item's common prefix length with its predecessor in that order."""
    n = len(items)
    if not share:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: _key(items[i].ids))
    return order, [0] + [lcp(items[order[j - 1]].ids, items[order[j]].ids) for j in range(1, n)]


def _pieces(
    order: Sequence[int], shared: Sequence[int], lengths: npt.NDArray[np.int64], capacity: int, min_shared: int
) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Runs of sorted neighbours that share a prefix (a tree each), split where a tree would exceed
    `capacity` tokens; the next piece then starts with its whole first candidate."""
    pieces: list[list[tuple[int, int]]] = []  # (item index, tokens shared with the previous item)
    sizes: list[int] = []
    for j, i in enumerate(order):
        common = shared[j] if shared[j] >= min_shared else 0
        if pieces and common > 0 and sizes[-1] + int(lengths[i]) - common <= capacity:
            pieces[-1].append((i, common))
            sizes[-1] += int(lengths[i]) - common
        else:
            pieces.append([(i, 0)])
            sizes.append(int(lengths[i]))
    return pieces, sizes


def _rows(sizes: Sequence[int], options: PackOptions) -> tuple[list[list[int]], list[int]]:
    """First-fit decreasing into rows as long as the largest piece (one piece per row when packing is
    off): independent pieces are packed only up to the row length the batch needs anyway."""
    rows: list[list[int]] = []
    fill: list[int] = []
    row_capacity = -(-max(sizes) // options.row_multiple) * options.row_multiple
    for p in sorted(range(len(sizes)), key=lambda p: -sizes[p]):
        if options.pack_rows:
            for r in range(len(rows)):
                if fill[r] + sizes[p] <= row_capacity:
                    rows[r].append(p)
                    fill[r] += sizes[p]
                    break
            else:
                rows.append([p])
                fill.append(sizes[p])
        else:
            rows.append([p])
            fill.append(sizes[p])
    return rows, fill


def pack(items: Sequence[Formatted], options: PackOptions, max_tokens: int | None = None, pad_id: int = 0) -> PackedBatch:
    """Lay out `items` in rows. Every item's reads map to entries of the [B, K] output.

    With `max_tokens`, rows beyond B * S <= max_tokens are left out (at least one row is kept) and
    their items are reported in `leftover`.
    """
    n = len(items)
    if n == 0:
        raise ValueError("pack() needs at least one item")
    if options.run_overhead is not None and n > 1:
        head_class = _head_length_class(items, options)
        if len(head_class) < n:
            return _pack_subset(items, head_class, replace(options, run_overhead=None), max_tokens, pad_id)
    lengths = np.array([it.num_tokens for it in items], dtype=np.int64)

    # 1. order and neighbour LCPs
    order, shared = _sorted_with_lcps(items, options.share_prefixes)

    # 2-3. pieces and rows for a few tree capacities; keep the cheapest layout. A larger capacity shares
    # more (fewer tokens) but makes longer rows, and attention costs every token the whole row length:
    # per token, cost ~ 1 + attention_cost * S (see PackOptions).
    longest = int(lengths.max())
    capacities = [longest]
    while options.share_prefixes and capacities[-1] < options.row_tokens:
        capacities.append(min(options.row_tokens, 2 * capacities[-1]))
    best: tuple[float, list[list[tuple[int, int]]], list[int], list[list[int]], list[int]] | None = None
    for capacity in capacities:
        pieces, sizes = _pieces(order, shared, lengths, capacity, options.min_shared)
        rows, fill = _rows(sizes, options)
        seq = -(-max(fill) // options.row_multiple) * options.row_multiple
        cost = len(rows) * seq * (1.0 + options.attention_cost * seq)
        if best is None or cost < best[0]:
            best = (cost, pieces, sizes, rows, fill)
    assert best is not None
    if options.plain_cost is not None:
        seq_plain = -(-longest // options.row_multiple) * options.row_multiple
        cost_plain = n * seq_plain * (1.0 + options.attention_cost * seq_plain) * options.plain_cost
        if cost_plain < best[0]:
            return _pack_plain(items, lengths, options.row_multiple, max_tokens, pad_id)
    _, pieces, sizes, rows, fill = best

    m = options.row_multiple
    seq = -(-max(fill) // m) * m
    leftover: list[int] = []
    if max_tokens is not None and len(rows) * seq > max_tokens:
        keep = max(1, max_tokens // seq)
        leftover = sorted(i for row in rows[keep:] for p in row for i, _ in pieces[p])
        rows, fill = rows[:keep], fill[:keep]
        seq = -(-max(fill) // m) * m
    batch = len(rows)
    input_ids = np.full((batch, seq), pad_id, dtype=np.int64)
    position_ids = np.zeros((batch, seq), dtype=np.int64)
    # Padding tokens see only themselves, so no attention row is empty.
    attn_end = np.tile(np.arange(1, seq + 1, dtype=np.int64), (batch, 1))
    item_layout: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)] * n
    item_tokens: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * n
    row_reads: list[npt.NDArray[np.int64]] = []
    path = np.zeros(int(lengths.max()), dtype=np.int64)

    for r, row in enumerate(rows):
        pos = 0
        for p in row:
            prev_len = 0
            for i, common in pieces[p]:
                ids = items[i].ids
                length = int(ids.shape[0])
                # tokens of the previous branch deeper than the shared prefix end their subtree here
                attn_end[r, path[common:prev_len]] = pos
                new = length - common
                input_ids[r, pos : pos + new] = ids[common:]
                position_ids[r, pos : pos + new] = np.arange(common, length)
                path[common:length] = np.arange(pos, pos + new)
                item_layout[i] = path[items[i].reads].copy()
                item_tokens[i] = (r * seq + path[:length]).astype(np.intp)
                pos += new
                prev_len = length
            attn_end[r, path[:prev_len]] = pos
        reads = np.unique(np.concatenate([item_layout[i] for p in row for i, _ in pieces[p]]))
        row_reads.append(reads)

    members = [[(i, item_layout[i]) for p in row for i, _ in pieces[p]] for row in rows]
    submitted = int(sum(int(lengths[i]) for row in rows for p in row for i, _ in pieces[p]))
    packed = _batch((input_ids, position_ids, attn_end), row_reads, members, n, submitted, int(sum(fill)), leftover)
    return replace(packed, item_tokens=item_tokens)


def _pack_subset(
    items: Sequence[Formatted], keep: list[int], options: PackOptions, max_tokens: int | None, pad_id: int
) -> PackedBatch:
    """Pack `items[keep]`; the others are left over. Indices in the result refer to `items`."""
    sub = pack([items[i] for i in keep], options, max_tokens, pad_id)
    reads: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * len(items)
    tokens: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * len(items)
    for k, i in enumerate(keep):
        reads[i] = sub.item_reads[k]
        if sub.item_tokens is not None:
            tokens[i] = sub.item_tokens[k]
    kept = set(keep)
    rest = [keep[k] for k in sub.leftover] + [i for i in range(len(items)) if i not in kept]
    return replace(sub, item_reads=reads, leftover=sorted(rest), item_tokens=tokens)


def _head_length_class(items: Sequence[Formatted], options: PackOptions) -> list[int]:
    """The items to run now: the length class of item 0 (the oldest), in a partition of the batch's
    trees, sorted by size, into contiguous classes of least estimated cost. A class of trees no longer
    than S costs about ceil(tokens / S) rows x S x (1 + attention_cost x S), plus the run's overhead.

    With sharing on, the trees are priced twice, as built (neighbours sharing a prefix in one tree) and as
    single candidates, and the cheaper partition decides. Candidates sharing only a short prefix (best-of-N's
    problem, unrelated solutions) make one large tree: priced as such, the whole batch is one class, and the
    layout that runs (which does not share, attention over a long row costing more than the prefix saves)
    pads every candidate to the longest; as singles, similar lengths run together and the rest waits."""
    assert options.run_overhead is not None
    lengths = np.array([it.num_tokens for it in items], dtype=np.int64)
    best: tuple[float, list[int]] | None = None
    for share in (True, False) if options.share_prefixes else (False,):
        order, shared = _sorted_with_lcps(items, share)
        pieces, sizes = _pieces(order, shared, lengths, max(options.row_tokens, int(lengths.max())), options.min_shared)
        cost, head = _cheapest_classes(pieces, sizes, options)
        if best is None or cost < best[0]:
            best = (cost, head)
    assert best is not None
    return best[1]


def _cheapest_classes(
    pieces: Sequence[Sequence[tuple[int, int]]], sizes: Sequence[int], options: PackOptions
) -> tuple[float, list[int]]:
    """The least estimated cost of running these trees in contiguous length classes (sorted by size), and
    the items of the class holding item 0."""
    assert options.run_overhead is not None
    by_size = sorted(range(len(pieces)), key=lambda p: -sizes[p])
    m, ac = options.row_multiple, options.attention_cost
    total = np.concatenate([[0], np.cumsum([sizes[p] for p in by_size])])
    # best[i]: least cost of the i largest trees; cut[i]: where its last class starts
    best = [0.0] + [math.inf] * len(by_size)
    cut = [0] * (len(by_size) + 1)
    for i in range(1, len(by_size) + 1):
        for j in range(i):
            seq = -(-sizes[by_size[j]] // m) * m
            rows = -(-int(total[i] - total[j]) // seq)
            cost = best[j] + rows * seq * (1.0 + ac * seq) + options.run_overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    head = next(k for k, p in enumerate(by_size) if any(i == 0 for i, _ in pieces[p]))
    end = len(by_size)
    while cut[end] > head:
        end = cut[end]
    chosen = by_size[cut[end] : end]
    return best[len(by_size)], sorted(i for p in chosen for i, _ in pieces[p])


def _batch(
    layout: tuple[I64Array, I64Array, I64Array],
    row_reads: Sequence[npt.NDArray[np.int64]],
    members: Sequence[Sequence[tuple[int, npt.NDArray[np.integer]]]],
    n: int,
    tokens_submitted: int,
    tokens_used: int,
    leftover: list[int],
    seq_lens: I64Array | None = None,
) -> PackedBatch:
    """The batch both layouts (prefix trees, plain rows) end in. `layout` is (input_ids, position_ids,
    attn_end); step_positions [B, K] come from each row's sorted distinct read positions, and per item
    (members[r]: the items of row r with their reads' positions in it) the flat indices of its reads in the
    [B * K] output."""
    k = max(1, max(len(r) for r in row_reads))
    step_positions = np.zeros((len(row_reads), k), dtype=np.int64)
    item_reads: list[npt.NDArray[np.intp]] = [np.empty(0, np.intp)] * n
    for r, reads in enumerate(row_reads):
        step_positions[r, : len(reads)] = reads
        for i, where in members[r]:
            item_reads[i] = (r * k + np.searchsorted(reads, where)).astype(np.intp)
    input_ids, position_ids, attn_end = layout
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attn_end=attn_end,
        step_positions=step_positions,
        item_reads=item_reads,
        tokens_submitted=tokens_submitted,
        tokens_used=tokens_used,
        reads_computed=int(sum(len(r) for r in row_reads)),
        leftover=leftover,
        seq_lens=seq_lens,
    )


def _pack_plain(
    items: Sequence[Formatted], lengths: npt.NDArray[np.int64], multiple: int, max_tokens: int | None, pad_id: int
) -> PackedBatch:
    """One item per row from position 0, right-padded: the plain graph's layout. Items are kept in their
    order; those past `max_tokens` go to `leftover`."""
    n = len(items)
    seq = -(-int(lengths.max()) // multiple) * multiple
    keep = n if max_tokens is None else min(n, max(1, max_tokens // seq))
    seq = -(-int(lengths[:keep].max()) // multiple) * multiple
    input_ids = np.full((keep, seq), pad_id, dtype=np.int64)
    position_ids = np.tile(np.arange(seq, dtype=np.int64), (keep, 1))
    # real tokens see their own sequence causally, padding tokens only themselves (as in pack)
    attn_end = np.where(position_ids < lengths[:keep, None], lengths[:keep, None], position_ids + 1)
    for r in range(keep):
        input_ids[r, : lengths[r]] = items[r].ids
    reads = [np.unique(items[r].reads).astype(np.int64) for r in range(keep)]
    members = [[(r, items[r].reads)] for r in range(keep)]
    used = int(lengths[:keep].sum())
    layout = (input_ids, position_ids, attn_end)
    batch = _batch(layout, reads, members, n, used, used, list(range(keep, n)), seq_lens=lengths[:keep].copy())
    tokens = [(r * seq + np.arange(lengths[r])).astype(np.intp) for r in range(keep)]
    return replace(batch, item_tokens=tokens + [np.empty(0, np.intp)] * (n - keep))
