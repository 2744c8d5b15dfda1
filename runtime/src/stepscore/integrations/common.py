"""What the framework adapters share: cutting a completion into steps, a search id per question, and the
pooled blocking client that sends one call per question.

Every framework hands its PRM a flat batch of (question, completion) entries, often several per question (a
beam search's beams, a GRPO group). `Scorer.score` regroups them: all of a question's completions go in one
call (chunked at `chunk` candidates), so the server shares their prefixes in one batch, and that call carries the
question's search id, the same at every iteration of a search, so the prefix cache serves the steps scored
before and a several-replica target (`ring_hash`, see stepscore.runtime.client) keeps the question on one
replica. Questions go out concurrently on a small thread pool; answers come back in the entries' order.

Unary calls rather than one stream per batch: a stream is one gRPC call, routed once by one search id, while
a batch of a best-of-n run or a GRPO step holds many questions, each its own search, each to be routed to the
replica that holds its prefixes. The frameworks call their PRM synchronously, so a blocking client serves them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client (grpc, numpy) loads at the first call, not when an adapter is imported
    from typing import Self  # Python 3.11+; the package supports 3.10

    from stepscore.runtime.client import Client
    from stepscore.runtime.types import CandidateScore

DEFAULT_TARGET = "127.0.0.1:50051"  # where `stepscore serve` listens by default
STEP_SEPARATOR = "\n\n"  # search-and-learn's and TRL's PRM step separator
CHUNK = 256  # candidates per call: well under the server's default --max-candidates (1024)
CONCURRENCY = 8  # questions in flight at once; the server batches across them


def split_steps(text: str, separator: str = STEP_SEPARATOR) -> list[str]:
    """A completion's steps: `text` cut at every `separator`, at least one step.

    A separator that ends the text ends its last step and adds no empty one: search-and-learn generates each
    step with `stop=["\\n\\n"]` kept in the output, so every unfinished beam ends with one (its Math-Shepherd
    class puts no tag after it either). Any other empty piece (an empty text, two separators in a row) is an
    empty step, which the server scores as the models' reference code does (its tag follows what precedes it),
    so the step count is what the framework expects."""
    if not separator:
        raise ValueError("the step separator must not be empty")
    steps = text.split(separator)
    if len(steps) > 1 and steps[-1] == "":
        steps.pop()
    return steps


def search_id_for(question: str, prefix: str = "") -> str:
    """The search id of every call about `question`: a digest of its text, so that each iteration of a search
    (and each process of a multi-process run) sends the same one without keeping state. `prefix` separates runs
    that must not end each other's entries."""
    digest = hashlib.blake2b(question.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return f"{prefix}{digest}"


@dataclass
class Usage:
    """Running totals over an adapter's calls: `cached_tokens` of `tokens` came from the server's prefix cache."""

    calls: int = 0
    candidates: int = 0
    tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Entry:
    """One question and its completions, each already cut into steps (a completion may be [] : not scored)."""

    question: str
    chains: Sequence[Sequence[str]]


class Scorer:
    """The adapters' client: `score(entries)` -> per entry, per completion, its `CandidateScore` (None for a
    completion with no steps). Raises the `stepscore.errors` type of the first failed call.

    The gRPC client and the thread pool are made at the first call and left out when the object is pickled
    (TRL and multiprocessing may pickle a reward function): a copy connects on its own first call."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        search_prefix: str | None = "",
        concurrency: int = CONCURRENCY,
        chunk: int = CHUNK,
        **client_options: Any,
    ) -> None:
        if concurrency < 1 or chunk < 1:
            raise ValueError(f"concurrency and chunk must be positive, got {concurrency} and {chunk}")
        self.target = target
        self.search_prefix = search_prefix  # None: calls carry no search id (no cache affinity, nothing to end)
        self.concurrency = concurrency
        self.chunk = chunk
        self.client_options = client_options
        self.usage = Usage()
        self._searches: dict[str, None] = {}  # search ids sent and not yet ended, in first-use order
        self._client: Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def search_id(self, question: str) -> str:
        return "" if self.search_prefix is None else search_id_for(question, self.search_prefix)

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                from stepscore.runtime.client import Client

                self._client = Client(self.target, **self.client_options)
            return self._client

    def score(self, entries: Sequence[Entry], **options: Any) -> list[list[CandidateScore | None]]:
        """Score every entry's completions; `options` are `Client.score`'s (aggregates, soft_min_temperature, ...)."""
        chains: dict[str, list[Sequence[str]]] = {}
        where: dict[str, list[tuple[int, int]]] = {}  # question -> (entry, completion) of each of its chains
        for i, entry in enumerate(entries):
            for j, chain in enumerate(entry.chains):
                if chain:
                    chains.setdefault(entry.question, []).append(chain)
                    where.setdefault(entry.question, []).append((i, j))
        jobs = [(q, start) for q in chains for start in range(0, len(chains[q]), self.chunk)]
        client = self.client

        def run(job: tuple[str, int]) -> list[CandidateScore]:
            question, start = job
            result = client.score(
                question, chains[question][start : start + self.chunk], search_id=self.search_id(question), **options
            )
            return result.candidates

        if len(jobs) <= 1:
            answers = [run(job) for job in jobs]  # the common beam-search case: one question, no thread hop
        else:
            answers = list(self._executor().map(run, jobs))
        out: list[list[CandidateScore | None]] = [[None] * len(entry.chains) for entry in entries]
        with self._lock:
            for (question, start), candidates in zip(jobs, answers, strict=True):
                for (i, j), candidate in zip(where[question][start : start + self.chunk], candidates, strict=True):
                    out[i][j] = candidate
                    self.usage.candidates += 1
                    self.usage.tokens += candidate.num_tokens
                    self.usage.cached_tokens += candidate.cached_tokens
                self.usage.calls += 1
                if self.search_prefix is not None:
                    self._searches[self.search_id(question)] = None
        return out

    def end(self, questions: Iterable[str] | None = None) -> int:
        """The searches over `questions` are over (None: every search this scorer sent and has not ended): the
        server frees the prefix-cache entries only they used. Returns the bytes freed."""
        if self.search_prefix is None:
            return 0
        with self._lock:
            ids = list(self._searches) if questions is None else list(dict.fromkeys(map(self.search_id, questions)))
        client = self.client
        freed = sum(self._executor().map(client.end_search, ids)) if len(ids) > 1 else sum(map(client.end_search, ids))
        with self._lock:
            for search_id in ids:
                self._searches.pop(search_id, None)
        return freed

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="stepscore-integration")
            return self._pool

    def close(self) -> None:
        with self._lock:
            client, pool, self._client, self._pool = self._client, self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None:
            client.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_client=None, _pool=None, _lock=None, _searches={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


__all__ = [
    "CHUNK",
    "CONCURRENCY",
    "DEFAULT_TARGET",
    "STEP_SEPARATOR",
    "Entry",
    "Scorer",
    "Usage",
    "search_id_for",
    "split_steps",
]


class SearchFacade:
    """What the search adapters (search-and-learn, OpenR) offer beside their framework's call: ending searches,
    their ids, usage counters, closing. Each adapter holds its `Scorer` as `_scorer`."""

    _scorer: Scorer

    def end(self, questions: Iterable[str] | None = None) -> int:
        """The searches over `questions` are finished (None: every search scored so far): the server frees the
        prefix-cache entries only they used. Returns the bytes freed."""
        return self._scorer.end(questions)

    def search_id(self, question: str) -> str:
        """The search id the calls about `question` carry (to read the server's view of that search)."""
        return self._scorer.search_id(question)

    @property
    def usage(self) -> Usage:
        return self._scorer.usage

    def close(self) -> None:
        self._scorer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
