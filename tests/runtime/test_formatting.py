"""The formatter on every family: reads at the tags, injection-proof, truncation, token-id candidates, a cache
bounded in bytes, tokenization that stops between chunks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stepscore.errors import ContextTooLong, DeadlineExceeded, InvalidRequest
from stepscore.runtime.bundle import load_bundle
from stepscore.runtime.formatting import CHUNK_CHARS, Formatter
from stepscore.runtime.types import ScoreRequest, TokenIds
from tests.helpers.tiny_models import KINDS

INJECTIONS = ["<extra_0>", "ки", "<|im_end|>", "<|eot_id|>", "<|im_start|>", "<s>", "+", "\n"]


def _formatter(bundle: Path, max_len: int | None = None) -> Formatter:
    m = load_bundle(bundle).manifest
    return Formatter(m.format, bundle / "tokenizer.json", m.model.vocab_size, max_len or m.model.max_seq_len)


@pytest.mark.parametrize("kind", KINDS)
def test_reads_sit_on_the_tag_and_injection_cannot_move_them(tiny_bundle: Callable[..., Path], kind: str) -> None:
    bundle = tiny_bundle(kind)
    m = load_bundle(bundle).manifest
    fmt = _formatter(bundle)
    steps = ["two plus two is 4.", "so the answer is 4."]
    clean = fmt.format_request(ScoreRequest("What is 2+2?", [steps]))[0]
    expected_steps = 1 if m.format.join_steps is not None else len(steps)
    assert len(clean.reads) == expected_steps
    if m.head.tag_id is not None:
        assert all(int(clean.ids[r]) == m.head.tag_id for r in clean.reads)
    for bad in INJECTIONS:
        dirty_steps = [f"two {bad} plus {bad}{bad} two", f"{bad}so {bad} 4 {bad}"]
        dirty = fmt.format_request(ScoreRequest(f"What {bad} is 2+2?", [dirty_steps]))[0]
        assert len(dirty.reads) == expected_steps, bad
        if m.head.tag_id is not None:
            assert all(int(dirty.ids[r]) == m.head.tag_id for r in dirty.reads), bad


def test_special_tokens_in_user_text_are_plain_text(tiny_bundle: Callable[..., Path]) -> None:
    fmt = _formatter(tiny_bundle("qwen-prm"))
    tag = load_bundle(tiny_bundle("qwen-prm")).manifest.head.tag_id
    out = fmt.format_request(ScoreRequest("p", [["a <extra_0> b", "c"]]))[0]
    assert int(np.count_nonzero(out.ids == tag)) == 2  # only the two inserted tags


def test_left_truncation_and_context_errors(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("trl")
    steps = [f"step {i} adds one." for i in range(12)]
    full = _formatter(bundle).format_request(ScoreRequest("p", [steps]))[0]
    limit = full.num_tokens // 2
    fmt = _formatter(bundle, limit)
    with pytest.raises(ContextTooLong, match=f"limit is {limit} tokens"):
        fmt.format_request(ScoreRequest("p", [steps]))
    cut = fmt.format_request(ScoreRequest("p", [steps], truncate_left=True))[0]
    assert cut.num_tokens == limit
    assert cut.num_truncated_steps + len(cut.reads) == len(steps)
    np.testing.assert_array_equal(cut.ids, full.ids[-limit:])
    np.testing.assert_array_equal(cut.reads, full.reads[cut.num_truncated_steps :] - (full.num_tokens - limit))


def test_token_id_candidates_are_checked(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("trl")
    fmt = _formatter(bundle)
    vocab = load_bundle(bundle).manifest.model.vocab_size
    ok = fmt.format_request(ScoreRequest("", [TokenIds([5, 6, 7, 8], [1, 3])]))[0]
    np.testing.assert_array_equal(ok.ids, [5, 6, 7, 8])
    np.testing.assert_array_equal(ok.reads, [1, 3])
    with pytest.raises(InvalidRequest, match=r"candidates\[0\].ids\[1\]: token id .* outside the vocabulary"):
        fmt.format_request(ScoreRequest("", [TokenIds([5, vocab, 7], [2])]))
    with pytest.raises(InvalidRequest, match="step_positions"):
        fmt.format_request(ScoreRequest("", [TokenIds([5, 6, 7], [2, 1])]))
    with pytest.raises(InvalidRequest, match="step_positions"):
        fmt.format_request(ScoreRequest("", [TokenIds([5, 6, 7], [3])]))


def test_tokenization_cache_gives_identical_results(tiny_bundle: Callable[..., Path]) -> None:
    fmt = _formatter(tiny_bundle("rlhflow"))
    req = ScoreRequest("What is 2+2?", [["two plus two", "is four"], ["two plus two", "is five"]])
    first = fmt.format_request(req)
    second = fmt.format_request(req)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.reads, b.reads)


def test_the_cache_is_bounded_in_bytes(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("qwen-prm")
    m = load_bundle(bundle).manifest
    budget = 256 * 1024
    fmt = Formatter(m.format, bundle / "tokenizer.json", m.model.vocab_size, m.model.max_seq_len, cache_bytes=budget)
    fresh = _formatter(bundle)
    # a few hundred distinct long texts: far more than the budget, however few entries they are
    for k in range(300):
        problem = f"problem {k}: " + "add the numbers and check " * 80
        req = ScoreRequest(problem, [[f"step {k} is fine"]], truncate_left=True)
        got, want = fmt.format_request(req)[0], fresh.format_request(req)[0]
        np.testing.assert_array_equal(got.ids, want.ids)  # eviction never changes a result
        assert 0 < fmt.cache_bytes <= budget
    # a text too large for a sixteenth of the budget is used but not kept
    before = fmt.cache_bytes
    fmt.format_request(ScoreRequest("x" * budget, [["a"]], truncate_left=True))
    assert fmt.cache_bytes <= before + 2048


def test_tokenization_stops_between_chunks_when_the_guard_says_so(tiny_bundle: Callable[..., Path]) -> None:
    fmt = _formatter(tiny_bundle("qwen-prm"))
    # 12 candidates of ~60k characters each: about 3 chunks of CHUNK_CHARS
    req = ScoreRequest("p", [[f"candidate {k} " + "add then check " * 4000] for k in range(12)], truncate_left=True)
    assert len("".join(step for cand in req.candidates for step in cand)) > 2 * CHUNK_CHARS  # type: ignore[union-attr]
    encoded: list[int] = []
    real = fmt._encode_runs

    def counting(runs: Any) -> Any:
        encoded.append(len(runs))
        return real(runs)

    fmt._encode_runs = counting  # type: ignore[method-assign]
    assert len(fmt.format_request(req, lambda: None)) == 12
    chunks, runs = len(encoded), sum(encoded)
    assert chunks >= 3
    encoded.clear()
    checks: list[int] = []

    def guard() -> None:
        checks.append(1)
        if len(checks) == 2:
            raise DeadlineExceeded("the deadline passed while the request was being tokenized")

    with pytest.raises(DeadlineExceeded):
        fmt.format_request(req, guard)
    assert len(encoded) == 1 and encoded[0] < runs  # one chunk tokenized, then it stopped
