"""Manifest-driven formatting: problem + steps -> token ids + the positions each step's score is read at.

No torch, no chat-template engine at run time: export rendered the model's template into a `FormatSpec`
(stepscore.runtime.bundle), and this module only concatenates its segments. Guarantees:

- Tags and special tokens come from the spec as ids. User text (the problem and the steps) is tokenized
  with special-token matching switched off, so a step containing `<extra_0>`, `<|im_end|>` or `ки` is
  plain text: it cannot add, drop or move a step.
- Read positions are computed here, on the CPU, from the structure of the format, never by searching
  the ids for a tag.
- Text runs are tokenized as the reference code tokenizes them (a run = the text between two id
  segments), so scores match the model's own scoring code.
- Runs are encoded with the Rust tokenizer's parallel batch encode and memoised: search clients resend
  the same prefix steps every iteration. The memo is bounded in bytes, not entries: a few long texts must
  not hold as much memory as thousands of short ones.
- A request is formatted in chunks of about `CHUNK_CHARS` characters; before each chunk the caller's guard
  may stop it (deadline passed, caller gone), so a large request stops costing CPU soon after nobody waits.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stepscore.errors import ContextTooLong, InvalidRequest
from stepscore.runtime.bundle import FormatSpec, Segment
from stepscore.runtime.types import Formatted, IntArray, ScoreRequest, TokenIds

CHUNK_CHARS = 1 << 18  # characters tokenized between two guard checks (~20-50 ms of one tokenizer thread)
# a cache entry's memory beyond its text and arrays: two ndarray headers, the entry object, the dict node
_ENTRY_OVERHEAD = 400


@dataclass(frozen=True)
class _Encoded:
    ids: IntArray
    ends: IntArray  # exclusive end (in characters) of each token

    def nbytes(self, text: str) -> int:
        """Memory this entry holds in the cache, with its key."""
        return sys.getsizeof(text) + self.ids.nbytes + self.ends.nbytes + _ENTRY_OVERHEAD


@dataclass
class _ReadRef:
    step: int
    piece: int
    pos: int  # char index of the marker's last character (runs) or index of its last id (ids)
    offset: int
    expect: int | None


@dataclass
class _Layout:
    pieces: list[str | tuple[int, ...]]
    reads: list[_ReadRef]


class Formatter:
    """Formats requests for one bundle. Thread-safe: the engine calls it from a worker pool."""

    def __init__(
        self,
        spec: FormatSpec,
        tokenizer_path: Path,
        vocab_size: int,
        max_seq_len: int,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # User text is plain text: special-token strings in it are split like any other text.
        self._tokenizer.encode_special_tokens = True
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0  # bytes the cache holds now
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------------

    def format_request(self, request: ScoreRequest, guard: Callable[[], None] | None = None) -> list[Formatted]:
        """Format every candidate of a request (raises InvalidRequest / ContextTooLong).

        Text candidates are tokenized in chunks of about CHUNK_CHARS characters; `guard()` runs before each
        chunk and stops the work by raising (stepscore.runtime.limits.WorkGuard: deadline, cancellation).
        """
        out: list[Formatted | None] = [None] * len(request.candidates)
        chunk: list[tuple[int, _Layout]] = []
        chars = 0

        def flush() -> None:
            if guard is not None:
                guard()
            encoded = self._encode_runs([p for _, layout in chunk for p in layout.pieces if isinstance(p, str)])
            for i, layout in chunk:
                ids, reads = self._assemble(i, layout, encoded)
                out[i] = self._fit(i, ids, reads, request.truncate_left)
            chunk.clear()

        for i, cand in enumerate(request.candidates):
            if isinstance(cand, TokenIds):
                ids, reads = self._check_token_ids(i, cand)
                out[i] = self._fit(i, ids, reads, request.truncate_left)
                continue
            layout = self._layout(request.problem, request.steps_of(cand))
            chunk.append((i, layout))
            chars += sum(len(p) for p in layout.pieces if isinstance(p, str))
            if chars >= CHUNK_CHARS:
                flush()
                chars = 0
        if chunk:
            flush()
        return [item for item in out if item is not None]

    def encode_text(self, text: str) -> list[int]:
        """Plain-text encoding of `text` (no special tokens), as user text is encoded."""
        return [int(t) for t in self._encode_runs([text])[text].ids]

    # -- layout ---------------------------------------------------------------------------------

    def _layout(self, problem: str, steps: Sequence[str]) -> _Layout:
        spec = self.spec
        if spec.join_steps is not None:
            steps = [spec.join_steps.join(steps)]
        pieces: list[str | tuple[int, ...]] = []
        reads: list[_ReadRef] = []
        run: list[str] = []
        run_len = 0

        def flush() -> None:
            nonlocal run_len
            text = "".join(run)
            if text:
                for ref in reads:
                    if ref.piece == -1:  # a text read waits for its run to become a piece
                        ref.piece = len(pieces)
                pieces.append(text)
            run.clear()
            run_len = 0

        def emit(seg: Segment, step_index: int, step_text: str) -> None:
            nonlocal run_len
            if seg.ids is not None:
                flush()
                pieces.append(seg.ids)
                if seg.read is not None:
                    reads.append(_ReadRef(step_index, len(pieces) - 1, len(seg.ids) - 1, seg.read.offset, seg.read.expect))
            elif seg.brk:
                flush()
            else:
                if seg.field == "problem":
                    text = spec.strip_problem.apply(problem)
                elif seg.field == "step":
                    text = step_text
                else:
                    text = seg.text or ""
                if seg.read is not None:
                    # The read is at the token covering the marker's last character. An empty
                    # marker cannot happen: export refuses it.
                    reads.append(_ReadRef(step_index, -1, run_len + len(text) - 1, seg.read.offset, seg.read.expect))
                run.append(text)
                run_len += len(text)

        for seg in spec.prompt:
            emit(seg, -1, "")
        for k, step in enumerate(steps):
            strip = spec.strip_first_step if k == 0 else spec.strip_step
            if k > 0:
                for seg in spec.separator:
                    emit(seg, k, "")
            for seg in spec.step:
                emit(seg, k, strip.apply(step))
        flush()
        return _Layout(pieces, reads)

    # -- tokenization ---------------------------------------------------------------------------

    def _encode_runs(self, runs: Sequence[str]) -> dict[str, _Encoded]:
        found: dict[str, _Encoded] = {}
        missing: list[str] = []
        with self._lock:
            for text in runs:
                if text in found:
                    continue
                hit = self._cache.get(text)
                if hit is None:
                    missing.append(text)
                    found[text] = _Encoded(np.empty(0, np.int32), np.empty(0, np.int32))  # placeholder
                else:
                    self._cache.move_to_end(text)
                    found[text] = hit
        if missing:
            # One call: the Rust tokenizer encodes the batch in parallel, without the GIL.
            encodings = self._tokenizer.encode_batch(missing, add_special_tokens=False)
            with self._lock:
                for text, enc in zip(missing, encodings, strict=True):
                    ids = np.asarray(enc.ids, dtype=np.int32)
                    ends = np.asarray([end for _, end in enc.offsets], dtype=np.int32)
                    item = _Encoded(ids, np.maximum.accumulate(ends) if ends.size else ends)
                    found[text] = item
                    self._remember(text, item)
        return found

    def _remember(self, text: str, item: _Encoded) -> None:
        """Cache `item` (lock held), evicting the least recently used entries past the byte budget. A text
        too large for a sixteenth of the budget is not kept: it would push out many useful entries."""
        size = item.nbytes(text)
        if size > self._cache_bytes // 16 or text in self._cache:
            return
        self._cache[text] = item
        self._cached += size
        while self._cached > self._cache_bytes and self._cache:
            old_text, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes(old_text)

    @property
    def cache_bytes(self) -> int:
        """Memory the tokenization cache holds now (an estimate: texts, arrays and per-entry overhead)."""
        return self._cached

    def _assemble(self, cand: int, layout: _Layout, encoded: dict[str, _Encoded]) -> tuple[IntArray, IntArray]:
        parts: list[IntArray] = []
        starts: list[int] = []
        total = 0
        for piece in layout.pieces:
            arr = encoded[piece].ids if isinstance(piece, str) else np.asarray(piece, dtype=np.int32)
            starts.append(total)
            parts.append(arr)
            total += int(arr.shape[0])
        ids = np.concatenate(parts) if parts else np.empty(0, np.int32)
        reads = np.empty(len(layout.reads), dtype=np.int32)
        for j, ref in enumerate(layout.reads):
            piece = layout.pieces[ref.piece]
            if isinstance(piece, str):
                enc = encoded[piece]
                tok = int(np.searchsorted(enc.ends, ref.pos, side="right"))
                if tok >= enc.ids.shape[0]:
                    raise InvalidRequest(f"candidates[{cand}].steps[{ref.step}]", "step tag did not tokenize")
            else:
                tok = ref.pos
            at = starts[ref.piece] + tok
            if ref.expect is not None and int(ids[at]) != ref.expect:
                raise InvalidRequest(
                    f"candidates[{cand}].steps[{ref.step}]",
                    f"the step's tag merged with the step's text when tokenized (got token {int(ids[at])}, "
                    f"expected {ref.expect}); remove trailing whitespace or unusual characters at the step's end",
                )
            reads[j] = at + ref.offset
        if reads.size and (reads[0] < 0 or np.any(np.diff(reads) <= 0)):
            raise InvalidRequest(f"candidates[{cand}]", "step read positions are not increasing (format error)")
        # Tokens after the last read cannot change any score: attention is causal.
        end = int(reads[-1]) + 1 if reads.size else 0
        return ids[:end], reads

    # -- checks ---------------------------------------------------------------------------------

    def _check_token_ids(self, cand: int, tokens: TokenIds) -> tuple[IntArray, IntArray]:
        where = f"candidates[{cand}]"
        ids = np.asarray(tokens.ids, dtype=np.int64)
        reads = np.asarray(tokens.step_positions, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidRequest(f"{where}.ids", "must be a non-empty list of token ids")
        if reads.ndim != 1 or reads.size == 0:
            raise InvalidRequest(f"{where}.step_positions", "must list at least one position")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            first = int(np.argmax(bad))
            raise InvalidRequest(
                f"{where}.ids[{first}]", f"token id {int(ids[first])} is outside the vocabulary [0, {self.vocab_size})"
            )
        if reads[0] < 0 or reads[-1] >= ids.size or np.any(np.diff(reads) <= 0):
            raise InvalidRequest(f"{where}.step_positions", f"must be strictly increasing indices into ids (0..{ids.size - 1})")
        end = int(reads[-1]) + 1
        return ids[:end].astype(np.int32), reads.astype(np.int32)

    def _fit(self, cand: int, ids: IntArray, reads: IntArray, truncate_left: bool) -> Formatted:
        n = int(ids.shape[0])
        if n == 0 or reads.size == 0:
            raise InvalidRequest(f"candidates[{cand}]", "has no steps")
        if n <= self.max_seq_len:
            return Formatted(ids, reads)
        if not truncate_left:
            raise ContextTooLong(
                f"candidates[{cand}]",
                f"is {n} tokens long; the model's limit is {self.max_seq_len} tokens (shorten it or ask for left truncation)",
            )
        cut = n - self.max_seq_len
        kept = reads >= cut
        return Formatted(ids[cut:], (reads[kept] - cut).astype(np.int32), int(np.count_nonzero(~kept)), cut)
