"""Packing and prefix sharing: the row layout equals scoring every candidate alone.

The structural property is checked exhaustively on random tries (hypothesis): from every token of a
candidate, the visible tokens of its row are exactly that candidate's prefix, at the right positions.
The numerical property is checked through real graphs of every family: packed scores equal scores of
each candidate alone within 1e-5 (fp32, CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscore.runtime.backend import OrtBackend
from stepscore.runtime.bundle import load_bundle
from stepscore.runtime.packing import PackOptions, SharedTokenCounter, pack
from stepscore.runtime.types import Formatted
from tests.helpers.tiny_models import KINDS


@st.composite
def tries(draw: st.DrawFn, vocab: int = 50, max_items: int = 12, max_len: int = 40) -> list[Formatted]:
    """Sequences that share prefixes at several levels (beams sharing earlier steps), duplicates included."""
    n = draw(st.integers(1, max_items))
    seqs: list[list[int]] = []
    for _ in range(n):
        reuse: bool = draw(st.booleans())
        if seqs and reuse:
            base = draw(st.sampled_from(seqs))
            base = base[: draw(st.integers(0, len(base)))]
        else:
            base = []
        tail = draw(st.lists(st.integers(1, vocab - 1), min_size=0 if base else 1, max_size=max_len))
        seq = (base + tail)[:max_len] or [1]
        seqs.append(seq)
    items = []
    for seq in seqs:
        reads = sorted(set(draw(st.lists(st.integers(0, len(seq) - 1), max_size=4))) | {len(seq) - 1})
        items.append(Formatted(np.array(seq, np.int32), np.array(reads, np.int32)))
    return items


options = st.builds(
    PackOptions,
    share_prefixes=st.booleans(),
    pack_rows=st.booleans(),
    row_tokens=st.integers(1, 120),
    row_multiple=st.sampled_from([1, 8, 16]),
    min_shared=st.integers(1, 4),
    attention_cost=st.sampled_from([0.0, 0.001, 0.05]),
    plain_cost=st.sampled_from([None, 0.0, 0.5, 1.0]),
    run_overhead=st.sampled_from([None, None, 0.0, 16.0]),
)


@settings(max_examples=400, deadline=None)
@given(items=tries(), opts=options)
def test_every_token_sees_exactly_its_own_prefix(items: list[Formatted], opts: PackOptions) -> None:
    batch = pack(items, opts)
    _b, s = batch.shape
    assert s % opts.row_multiple == 0
    j = np.arange(s)
    flat_reads = batch.step_positions.reshape(-1)
    left = set(batch.leftover)
    assert 0 not in left  # the oldest candidate always runs: the queue always moves
    if opts.run_overhead is None:
        assert not left
    for i, item in enumerate(items):
        where = batch.item_reads[i]
        if i in left:
            assert len(where) == 0
            continue
        assert len(where) == len(item.reads)
        rows = where // batch.step_positions.shape[1]
        assert len(set(rows.tolist())) == 1  # a candidate lives in one row
        row = int(rows[0])
        for depth_read, flat in zip(item.reads, where, strict=True):
            p = int(flat_reads[flat])
            visible = np.flatnonzero((j <= p) & (p < batch.attn_end[row]))
            # the visible tokens are the candidate's prefix, in order, at positions 0..depth
            np.testing.assert_array_equal(batch.input_ids[row, visible], item.ids[: depth_read + 1])
            np.testing.assert_array_equal(batch.position_ids[row, visible], np.arange(depth_read + 1))
    assert batch.tokens_used <= batch.tokens_computed
    if not opts.share_prefixes:
        assert batch.tokens_used == sum(it.num_tokens for i, it in enumerate(items) if i not in left)
    if opts.plain_cost == 0.0:
        assert batch.seq_lens is not None  # plain rows asked for every batch
    if opts.plain_cost is None or opts.plain_cost >= 1.0:
        assert batch.seq_lens is None  # never chosen, or never cheaper than the tree layout it includes
    if batch.seq_lens is not None and not left:
        # the plain graph's layout: item r alone in row r from position 0, its length in seq_lens
        assert batch.shape[0] == len(items)
        for r, item in enumerate(items):
            assert batch.seq_lens[r] == item.num_tokens
            np.testing.assert_array_equal(batch.input_ids[r, : item.num_tokens], item.ids)


def test_shared_prefix_is_laid_out_once_and_read_once() -> None:
    prefix = list(range(1, 101))
    items = [Formatted(np.array([*prefix, 200 + k, 300 + k], np.int32), np.array([49, 99, 101], np.int32)) for k in range(8)]
    batch = pack(items, PackOptions(row_tokens=1024))
    assert batch.shape[0] == 1
    assert batch.tokens_used == 100 + 8 * 2
    assert batch.reads_computed == 2 + 8  # the two prefix steps once, each candidate's own step once
    unshared = pack(items, PackOptions(row_tokens=1024, share_prefixes=False))
    assert unshared.tokens_used == 8 * 102


def test_trees_larger_than_a_row_split_cleanly_and_budget_leaves_leftovers() -> None:
    prefix = list(range(1, 41))
    items = [Formatted(np.array(prefix + [100 + k] * 20, np.int32), np.array([59], np.int32)) for k in range(10)]
    batch = pack(items, PackOptions(row_tokens=128, row_multiple=1))
    assert batch.shape[0] > 1 and batch.shape[1] <= 128  # the tree was split into rows
    limited = pack(items, PackOptions(row_tokens=128, row_multiple=1), max_tokens=128)
    assert limited.shape[0] == 1 and limited.leftover
    assert all(len(limited.item_reads[i]) == 0 for i in limited.leftover)


def test_plain_rows_are_chosen_by_cost_and_respect_the_budget() -> None:
    # 4 unrelated candidates of similar length: the tree layout cannot share, so a plain layout that is
    # cheaper per token wins; one that costs the same never does (the tree layout packs at least as well)
    items = [Formatted(np.arange(1, 30 + k, dtype=np.int32) + 50 * k, np.array([28 + k], np.int32)) for k in range(4)]
    assert pack(items, PackOptions(row_multiple=8, plain_cost=0.8)).seq_lens is not None
    assert pack(items, PackOptions(row_multiple=8, plain_cost=1.0)).seq_lens is None
    # a long shared prefix: the tree layout computes it once, which beats a discount on plain rows
    prefix = list(range(1, 201))
    shared = [Formatted(np.array([*prefix, 300 + k], np.int32), np.array([200], np.int32)) for k in range(8)]
    assert pack(shared, PackOptions(row_tokens=1024, plain_cost=0.5)).seq_lens is None
    limited = pack(items, PackOptions(row_multiple=8, plain_cost=0.0), max_tokens=2 * 40)
    assert limited.shape == (2, 32) and limited.leftover == [2, 3]
    assert limited.seq_lens is not None and limited.seq_lens.tolist() == [29, 30]
    assert limited.tokens_used == 29 + 30 and 0 < limited.padding_fraction < 0.1


def test_mixed_lengths_run_one_length_class_at_a_time() -> None:
    # ProcessBench-like: independent solutions of very different lengths. One run would pad the short
    # ones or pack them into long rows; with a run overhead the oldest one's length class runs now.
    rng = np.random.default_rng(3)
    lengths = [455, 175, 631, 949, 1543, 204, 690, 1078]
    items = [Formatted(rng.integers(1, 50_000, n).astype(np.int32), np.array([n - 1], np.int32)) for n in lengths]
    opts = PackOptions(row_multiple=16, attention_cost=5e-4, run_overhead=16.0)
    one_run = pack(items, replace(opts, run_overhead=None))
    assert not one_run.leftover and one_run.shape[1] >= 1543  # the 175-token one runs in a long row
    pending = list(range(len(items)))
    runs: list[tuple[list[int], int]] = []
    while pending:  # what the scheduler does with leftovers: they go first in the next batch
        batch = pack([items[i] for i in pending], opts)
        assert 0 not in batch.leftover and batch.padding_fraction < 0.05
        runs.append((sorted(lengths[pending[k]] for k in range(len(pending)) if k not in batch.leftover), batch.shape[1]))
        pending = [pending[k] for k in batch.leftover]
    assert sorted(n for run, _ in runs for n in run) == sorted(lengths)  # every candidate ran exactly once
    assert len(runs) > 1
    assert all(row < 1000 for run, row in runs if 175 in run)  # short ones run in short rows
    # similar lengths stay together in one run
    same = [Formatted(rng.integers(1, 50_000, 500 + k).astype(np.int32), np.array([499], np.int32)) for k in range(6)]
    assert not pack(same, opts).leftover


def test_attention_cost_trades_sharing_for_shorter_rows() -> None:
    # 8 candidates of 100 tokens sharing a 20-token prefix: one 660-token tree row, or 8 short rows
    prefix = list(range(1, 21))
    items = [Formatted(np.array([*prefix, *([100 + k] * 80)], np.int32), np.array([99], np.int32)) for k in range(8)]
    free = pack(items, PackOptions(row_tokens=1024, row_multiple=1))
    assert free.shape == (1, 20 + 8 * 80)
    costly = pack(items, PackOptions(row_tokens=1024, row_multiple=1, attention_cost=0.01))
    assert costly.shape[1] < 200  # rows no longer than a few candidates: attention dominates
    long_shared = [Formatted(np.array([*range(1, 501), 900 + k], np.int32), np.array([500], np.int32)) for k in range(8)]
    tree = pack(long_shared, PackOptions(row_tokens=1024, row_multiple=1, attention_cost=0.01))
    assert tree.shape == (1, 508)  # a long shared prefix is still worth one row


def test_shared_token_counter_matches_a_trie() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 4, size=rng.integers(1, 12)).astype(np.int32) for _ in range(200)]
    counter = SharedTokenCounter(share=True)
    for s in seqs:
        counter.add(s)
    trie_nodes = {tuple(s[: k + 1].tolist()) for s in seqs for k in range(len(s))}
    assert counter.total == len(trie_nodes)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_scores_equal_alone_on_every_family(tiny_bundle: Callable[..., Path], kind: str) -> None:
    bundle = tiny_bundle(kind)
    backend = OrtBackend(bundle / "model.onnx", plain_graph_path=bundle / "model_plain.onnx")
    vocab = load_bundle(bundle).manifest.model.vocab_size

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(items=tries(vocab=vocab - 1, max_items=8, max_len=60), opts=options)
    def check(items: list[Formatted], opts: PackOptions) -> None:
        alone = []
        for item in items:
            b = pack([item], PackOptions(share_prefixes=False, row_tokens=1))
            alone.append(backend.run(b).reshape(-1)[b.item_reads[0]])
        batch = pack(items, opts)
        flat = backend.run(batch).reshape(-1)
        for i, (item_alone, where) in enumerate(zip(alone, batch.item_reads, strict=True)):
            if i not in batch.leftover:
                np.testing.assert_allclose(flat[where], item_alone, atol=1e-5, rtol=0)

    check()


def test_candidates_sharing_a_short_prefix_run_by_length_class() -> None:
    # Best-of-N: three solutions of one problem (a 40-token prompt in common), 455, 456 and 326 tokens. As
    # one shared tree they would be one class; the row that runs would not share (attention over a 1,100-
    # token row costs more than 80 tokens saved) and would pad the short one to 464. Priced as single
    # candidates, the two long ones run now and the short one waits for its own class.
    rng = np.random.default_rng(5)
    prompt = rng.integers(1, 50_000, 40)
    items = [
        Formatted(np.concatenate([prompt, rng.integers(1, 50_000, n - 40)]).astype(np.int32), np.array([n - 1], np.int32))
        for n in (455, 456, 326)
    ]
    opts = PackOptions(row_multiple=16, attention_cost=1e-3, run_overhead=20.0)
    batch = pack(items, opts)
    assert batch.leftover == [2] and batch.shape == (2, 464) and batch.tokens_used == 455 + 456
    # a long prefix in common is still one tree, run at once
    long_prompt = rng.integers(1, 50_000, 400)
    beams = [
        Formatted(np.concatenate([long_prompt, [60_000 + k] * (k + 5)]).astype(np.int32), np.array([400], np.int32))
        for k in range(3)
    ]
    tree = pack(beams, opts)
    assert not tree.leftover and tree.shape[0] == 1 and tree.tokens_used < sum(b.num_tokens for b in beams)
