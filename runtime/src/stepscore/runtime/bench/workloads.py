"""Workloads: lists of `ScoreRequest`s shaped like real PRM client traffic.

Real traces are read by path from a data folder given by `--data` or the STEPSCORE_DATA environment variable
(the shared data folder, see its README; never copied into the repository); there is no built-in location.
Text only: tokenization happens in the engine or server, with the bundle's own tokenizer, exactly as for a
real client.

| name           | source                                            | one request is                                  |
|----------------|---------------------------------------------------|-------------------------------------------------|
| bon16          | search_traces_sal/*best_of_n_N16*.jsonl.gz        | one problem with its 16 completions             |
| bon256         | search_traces_sal/*best_of_n_N256*.jsonl.gz       | one problem with its 256 completions            |
| beam           | search_traces_sal/*beam_search_N16*.jsonl.gz      | one beam-search iteration of one problem        |
| dvts           | search_traces_sal/*beam_search_N16*.jsonl.gz      | one DVTS iteration of one problem               |
| processbench   | processbench/*.json.gz                            | one solution (one candidate)                    |
| pb-bon3 (1)    | processbench/*.json.gz                            | 3 unrelated solutions, 300-600 tokens, as ids   |
| synthetic      | generated (Best-of-N length distributions)        | one problem with 16 random-word completions     |
| synthetic-beam | generated (beam-search length distributions)      | one iteration of a simulated beam search        |
| arith          | the embedded model's arithmetic policy            | one problem with 8 sampled chains (Best-of-N)   |
| arith-beam     | the embedded model's arithmetic policy            | one beam-search iteration (16 = 4 beams x 4)    |

(1) Not in WORKLOADS: its lengths are counted in a bundle's own formatted tokens, so it is built with that
bundle's formatter by `processbench_best_of_n_workload`, not by `load_workload`.

The arith workloads are the embedded default model's own traffic: problems and chains in the one format it
was trained on (stepscore.runtime.default_model.arith), each short enough for its 512-token context, so
`stepscore bench` with no arguments measures real scoring of the model it ships with.

Completions are split into steps on "\\n\\n", as search-and-learn does before calling its PRM; steps that
are empty after stripping are dropped, as in every figure recorded so far (the engine itself scores an empty
step as the reference code does).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stepscore.errors import ConfigError
from stepscore.runtime.types import ScoreRequest, TokenIds

if TYPE_CHECKING:
    from stepscore.runtime.formatting import Formatter

# A rebuilt call: problem, candidates (each a list of steps), and the number of the search it belongs to
# (-1: no search, the call stands alone).
SearchCall = tuple[str, list[list[str]], int]

STEP_SPLIT = "\n\n"  # search-and-learn's step delimiter (data README)

# search-and-learn's beam search: n = 16 candidates scored per iteration, the best n / beam_width = 4 kept,
# each kept beam extended beam_width = 4 times; at most 40 iterations, the last one generating to the end.
BEAM_N = 16
BEAM_WIDTH = 4
BEAM_MAX_ITERATIONS = 40

WORKLOADS: dict[str, str] = {
    "bon16": "Best-of-N, N = 16: one request per MATH problem with its 16 completions (search-and-learn traces)",
    "bon256": "Best-of-N, N = 256: one request per MATH problem with its 256 completions (search-and-learn traces)",
    "beam": "beam search (16 candidates, beam width 4): one request per problem and iteration, whole prefix + new step",
    "dvts": "DVTS (16 candidates in 4 independent subtrees of width 4): one request per problem and iteration",
    "processbench": "ProcessBench: one request per solution (one candidate), four subsets interleaved",
    "step-by-step": "ProcessBench solutions scored as they are written: steps[:1], steps[:2], ... (one candidate per "
    "call, one search per solution), solutions interleaved",
    "synthetic": "random words, Best-of-N N = 16, step counts and step lengths drawn like the Best-of-N traces",
    "synthetic-beam": "random words, a simulated beam search (16 candidates, width 4), lengths like the beam traces",
    "arith": "the embedded model's arithmetic: Best-of-N, N = 8 chains sampled from its policy per problem",
    "arith-beam": "the embedded model's arithmetic: beam search (16 candidates = 4 kept beams x 4 next steps), "
    "whole prefix + new step",
}
ARITH_N = 8  # chains per Best-of-N request, as `stepscore demo` samples
DATA_ENV = "STEPSCORE_DATA"


@dataclass(frozen=True)
class Workload:
    """A named list of requests, and where they came from."""

    name: str
    description: str
    requests: list[ScoreRequest]
    source: str  # the files read, or how the requests were generated

    @property
    def num_candidates(self) -> int:
        return sum(len(r.candidates) for r in self.requests)

    @property
    def num_steps(self) -> int:
        return sum(request_steps(r) for r in self.requests)

    def describe(self) -> dict[str, Any]:
        """Shape statistics for reports."""
        cands = [len(r.candidates) for r in self.requests]
        steps = [len(c) for r in self.requests for c in r.candidates if not isinstance(c, TokenIds)]
        chars = [sum(len(s) for s in c) for r in self.requests for c in r.candidates if not isinstance(c, TokenIds)]
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "requests": len(self.requests),
            "candidates": self.num_candidates,
            "steps": self.num_steps,
            "candidates_per_request_mean": float(np.mean(cands)) if cands else 0.0,
            "steps_per_candidate_mean": float(np.mean(steps)) if steps else 0.0,
            "chars_per_candidate_mean": float(np.mean(chars)) if chars else 0.0,
        }


def request_steps(request: ScoreRequest) -> int:
    """Steps a request asks scores for (token-id candidates count their step positions)."""
    return sum(len(c.step_positions) if isinstance(c, TokenIds) else len(c) for c in request.candidates)


def default_data_dir() -> Path | None:
    """The data folder named by $STEPSCORE_DATA; None when it is not set (no built-in location)."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None


def split_steps(completion: str) -> list[str]:
    """A completion's steps, as search-and-learn splits them; empty steps dropped."""
    return [s for s in completion.split(STEP_SPLIT) if s.strip()]


def load_workload(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    *,
    seed: int = 0,
    aggregates: Sequence[str] = ("min",),
    truncate_left: bool = False,
    synthetic_scale: float = 1.0,
    synthetic_requests: int = 64,
) -> Workload:
    """The requests of workload `name` (one of WORKLOADS).

    `limit` caps the number of requests (the beam workload takes whole problems, all their iterations,
    while they fit; at least one). Synthetic workloads make `limit` requests, or `synthetic_requests`
    without a limit; `synthetic_scale` multiplies their step lengths (small models have short contexts).
    Requests carry `aggregates` and `truncate_left` as given, and ids "<name>-<index>".
    """
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"the request limit must be at least 1, got {limit}")
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    rng = np.random.default_rng(seed)
    raw: list[SearchCall]
    if name == "arith":
        raw = _no_search(arith_best_of_n(limit or synthetic_requests, seed))
        source = f"generated by the arithmetic policy (seed {seed})"
    elif name == "arith-beam":
        raw = arith_beam(limit or synthetic_requests, seed)
        source = f"generated by the arithmetic policy (seed {seed})"
    elif name == "synthetic":
        count = limit or synthetic_requests
        raw = _no_search(synthetic_best_of_n(count, rng, scale=synthetic_scale))
        source = f"generated (seed {seed}, scale {synthetic_scale:g})"
    elif name == "synthetic-beam":
        raw = _no_search(synthetic_beam(limit or synthetic_requests, rng, scale=synthetic_scale))
        source = f"generated (seed {seed}, scale {synthetic_scale:g})"
    elif data is None:  # every workload left reads real traces
        raise ConfigError(
            f"workload {name} reads real traces: pass --data DIR (the folder holding search_traces_sal/ and "
            f"processbench/) or set {DATA_ENV}; or use --workload synthetic"
        )
    elif name in ("bon16", "bon256"):
        n = 16 if name == "bon16" else 256
        paths = _trace_files(data, f"*best_of_n_N{n}*.jsonl.gz")
        raw = _no_search(_take(best_of_n(_interleave([_read_jsonl(p) for p in paths])), limit))
        source = _describe(paths)
    elif name in ("beam", "dvts"):
        paths = _trace_files(data, "*beam_search_N16*.jsonl.gz")
        records = list(_interleave([_read_jsonl(p) for p in paths]))
        rebuild = beam_search_iterations if name == "beam" else dvts_iterations
        raw = rebuild(records, rng, limit=limit)
        source = _describe(paths)
    else:  # processbench, step-by-step
        paths, subsets = _processbench_subsets(data, "; pass --data, or use --workload synthetic")
        if name == "processbench":
            raw = _no_search(_take(processbench(_interleave(subsets)), limit))
        else:
            raw = step_by_step(processbench(_interleave(subsets)), limit)
        source = _describe(paths)
    requests = [
        ScoreRequest(
            problem=problem,
            candidates=candidates,
            aggregates=tuple(aggregates),
            truncate_left=truncate_left,
            request_id=f"{name}-{i}",
            search_id=search_id(name, problem, search),
        )
        for i, (problem, candidates, search) in enumerate(raw)
    ]
    if not requests:
        raise ConfigError(f"workload {name} has no requests (source: {source})")
    return Workload(name, WORKLOADS[name], requests, source)


# --- real traces ---------------------------------------------------------------------------------


def _processbench_subsets(data: Path, hint: str = "") -> tuple[list[Path], list[list[dict[str, Any]]]]:
    """The ProcessBench files under `data`/processbench (sorted) and their records, one list per subset."""
    folder = data / "processbench"
    paths = sorted(folder.glob("*.json.gz"))
    if not paths:
        raise ConfigError(f"no ProcessBench files (*.json.gz) in {folder}{hint}")
    subsets = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            subsets.append(json.load(fh))
    return paths, subsets


def _describe(paths: Sequence[Path]) -> str:
    # relative to where the benchmark runs, so a report says ../shared/data/... rather than one machine's paths
    return ", ".join(os.path.relpath(p) for p in paths)


def _trace_files(data: Path, pattern: str) -> list[Path]:
    folder = data / "search_traces_sal"
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise ConfigError(f"no search-and-learn traces {pattern} in {folder}; pass --data, or use --workload synthetic")
    return paths


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _interleave(sources: Sequence[Sequence[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Round-robin over several files, so a limited run samples every one of them."""
    for k in range(max((len(s) for s in sources), default=0)):
        for source in sources:
            if k < len(source):
                yield source[k]


def _take(items: Iterable[tuple[str, list[list[str]]]], limit: int | None) -> Iterator[tuple[str, list[list[str]]]]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


def best_of_n(records: Iterable[dict[str, Any]]) -> Iterator[tuple[str, list[list[str]]]]:
    """One request per problem: its N completions, each split into steps (empty completions dropped)."""
    for record in records:
        candidates = [steps for steps in (split_steps(c) for c in record["completions"]) if steps]
        if candidates:
            yield record["problem"], candidates


def processbench(records: Iterable[dict[str, Any]]) -> Iterator[tuple[str, list[list[str]]]]:
    """One request per solution.

    A ProcessBench evaluation sends each solution as it comes, and different solutions have different
    problems, so the request holds one candidate and batching happens across requests: the workload that
    tests cross-request batching with (almost) no shared prefixes.
    """
    for record in records:
        steps = [s for s in record["steps"] if s.strip()]
        if steps:
            yield record["problem"], [steps]


def step_by_step(solutions: Iterable[tuple[str, list[list[str]]]], limit: int | None) -> list[SearchCall]:
    """Each solution scored as a step-level verifier scores it while it is generated: steps[:1], then
    steps[:2], ..., one call each. Solutions are interleaved call by call (a client verifying many
    generations at once); `limit` keeps whole solutions while their calls fit (at least one)."""
    per_solution: list[tuple[str, list[list[list[str]]]]] = []
    total = 0
    for problem, (steps,) in solutions:
        calls = [[steps[:k]] for k in range(1, len(steps) + 1)]
        if limit is not None and per_solution and total + len(calls) > limit:
            break
        per_solution.append((problem, calls))
        total += len(calls)
    return _iteration_major(per_solution)


def _no_search(calls: Iterable[tuple[str, list[list[str]]]]) -> list[SearchCall]:
    return [(problem, candidates, -1) for problem, candidates in calls]


def search_id(workload: str, problem: str, search: int) -> str:
    """The id of a rebuilt call's search: `search` numbers the searches of the workload (each problem's beam
    search or DVTS, each step-by-step solution; two traces may search the same problem, so the problem alone
    does not name one); -1 (calls of no search: Best-of-N, ProcessBench) gives ""."""
    if search < 0:
        return ""
    key = problem + "\x00" + str(search)
    return f"{workload}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


PB_BON_N = 3  # solutions per ProcessBench Best-of-N request
PB_BON_TOKENS = (300, 600)  # formatted length (tokens, template included) a solution must have, both ends kept


def processbench_best_of_n_workload(
    data_dir: str | os.PathLike[str],
    formatter: Formatter,
    limit: int | None = None,
    *,
    n: int = PB_BON_N,
    min_tokens: int = PB_BON_TOKENS[0],
    max_tokens: int = PB_BON_TOKENS[1],
    aggregates: Sequence[str] = ("min",),
    name: str = "pb-bon3",
) -> Workload:
    """Best-of-N requests of `n` unrelated ProcessBench solutions each, given as token ids.

    Every solution is formatted alone (its own problem, its steps, the bundle's template) by `formatter`,
    the bundle's own formatter; those of `min_tokens` to `max_tokens` tokens are kept, in the order of the
    four subsets interleaved (the files sorted by name, then record order: deterministic, no sampling), and
    grouped `n` at a time, no two with the same problem in one request. A request's candidates thus share
    nothing but the template, and have lengths that stay within a 2x band: the traffic of a Best-of-N client
    scoring short batches of mixed problems. `limit` caps the number of requests; a last incomplete group is
    dropped. Candidates are `TokenIds` (`ScoreRequest.problem` is empty): every system computes the same
    tokens and none of them tokenizes.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if not 0 < min_tokens <= max_tokens:
        raise ConfigError(f"the token range must satisfy 0 < min <= max, got {min_tokens}..{max_tokens}")
    if limit is not None and limit < 1:
        raise ConfigError(f"the request limit must be at least 1, got {limit}")
    paths, subsets = _processbench_subsets(Path(data_dir))
    groups = list(
        _take_groups(_sized_solutions(processbench(_interleave(subsets)), formatter, min_tokens, max_tokens), n, limit)
    )
    requests = [
        ScoreRequest(problem="", candidates=[ids for _, ids in group], aggregates=tuple(aggregates), request_id=f"{name}-{i}")
        for i, group in enumerate(groups)
    ]
    if not requests:
        folder = Path(data_dir) / "processbench"
        raise ConfigError(f"no {n} ProcessBench solutions of {min_tokens}-{max_tokens} tokens in {folder}")
    description = (
        f"Best-of-N, N = {n}: {n} unrelated ProcessBench solutions of {min_tokens}-{max_tokens} formatted tokens "
        "per request, as token ids"
    )
    return Workload(name, description, requests, _describe(paths))


def _sized_solutions(
    solutions: Iterable[tuple[str, list[list[str]]]], formatter: Formatter, min_tokens: int, max_tokens: int
) -> Iterator[tuple[str, TokenIds]]:
    """Each solution formatted alone, as (problem, token ids), when its length is within the range."""
    for problem, candidates in solutions:
        # left truncation: a solution past the model's context comes back cut (and is skipped), not refused
        (item,) = formatter.format_request(ScoreRequest(problem=problem, candidates=candidates, truncate_left=True))
        if min_tokens <= item.num_tokens <= max_tokens and item.num_truncated_steps == 0:
            yield problem, TokenIds([int(t) for t in item.ids], [int(r) for r in item.reads])


def _take_groups(items: Iterable[tuple[str, TokenIds]], n: int, limit: int | None) -> Iterator[list[tuple[str, TokenIds]]]:
    """Consecutive groups of `n` items with distinct problems (an item whose problem the open group has
    waits for the next one); at most `limit` groups."""
    open_groups: list[list[tuple[str, TokenIds]]] = []
    made = 0
    for item in items:
        group = next((g for g in open_groups if all(p != item[0] for p, _ in g)), None)
        if group is None:
            group = []
            open_groups.append(group)
        group.append(item)
        if len(group) == n:
            open_groups.remove(group)
            yield group
            made += 1
            if limit is not None and made >= limit:
                return


def _problems_and_pool(records: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, list[list[str]]]], dict[int, list[str]]]:
    """Each record's problem and its completions split into steps, and every step by its depth."""
    problems = [(r["problem"], [s for s in (split_steps(c) for c in r["completions"]) if s]) for r in records]
    problems = [(p, c) for p, c in problems if c]
    pool: dict[int, list[str]] = {}
    for _, completions in problems:
        for steps in completions:
            for depth, step in enumerate(steps):
                pool.setdefault(depth, []).append(step)
    return problems, pool


def _iteration_major(per_search: Sequence[tuple[str, list[list[list[str]]]]]) -> list[SearchCall]:
    """Calls ordered iteration by iteration across searches, as a client searching many problems at once; each
    call carries its search's number (its place in `per_search`)."""
    out: list[SearchCall] = []
    for t in range(max((len(c) for _, c in per_search), default=0)):
        for k, (problem, calls) in enumerate(per_search):
            if t < len(calls):
                out.append((problem, calls[t], k))
    return out


def beam_search_iterations(
    records: Sequence[dict[str, Any]],
    rng: np.random.Generator,
    limit: int | None = None,
    n: int = BEAM_N,
    beam_width: int = BEAM_WIDTH,
    max_iterations: int = BEAM_MAX_ITERATIONS,
) -> list[SearchCall]:
    """Rebuild the PRM calls a beam search made from its final beams.

    search-and-learn's beam search scores `n` = 16 candidates per problem at every iteration: the
    `n / beam_width` = 4 beams kept at the previous iteration, each copied `beam_width` = 4 times and
    extended by one newly generated step, sent as the whole prefix + new step. Only the final beams
    survive in the trace (16 completions per problem), so iteration t is rebuilt as:

    - the known candidates are the distinct t-step prefixes of the completions that have at least t
      steps (each is a candidate the search really scored at iteration t: it has a surviving descendant);
    - the parents are their distinct (t - 1)-step prefixes (the kept beams; at most 4, as the search keeps);
    - the candidates the search pruned left no text, so the call is filled up to `n` with stand-ins: a
      parent (round-robin) + a real step taken at random (seeded) from the traces' steps at depth t, so
      every candidate in a call ends in its own step, as sampled siblings do.

    Pruned lineages are lost: all candidates descend from surviving parents, so prefixes are shared a
    little more than in the real run (where up to 4 kept beams may have had different histories). The
    search stops after `max_iterations` = 40; the last iteration generates to the end, so its candidates
    are the whole completions. Requests are ordered iteration by iteration across problems, like a client
    searching many problems at once. `limit` keeps whole problems while their requests fit (at least one).
    """
    problems, pool = _problems_and_pool(records)  # stand-in steps by depth (0-based), from every problem
    everything = [s for steps in pool.values() for s in steps]

    per_problem: list[tuple[str, list[list[list[str]]]]] = []
    total = 0
    for problem, completions in problems:
        iterations = min(max(len(s) for s in completions), max_iterations)
        calls: list[list[list[str]]] = []
        for t in range(1, iterations + 1):
            last = t == max_iterations
            survivors = _unique(tuple(s) if last else tuple(s[:t]) for s in completions if len(s) >= t)
            parents = _unique(s[: t - 1] for s in survivors)
            candidates = [list(s) for s in survivors[:n]]
            depth_pool = pool.get(t - 1) or everything
            k = 0
            while len(candidates) < n:
                parent = parents[k % len(parents)]
                k += 1
                candidates.append([*parent, depth_pool[int(rng.integers(len(depth_pool)))]])
            calls.append(candidates)
        if limit is not None and per_problem and total + len(calls) > limit:
            break
        per_problem.append((problem, calls))
        total += len(calls)
    return _iteration_major(per_problem)


def dvts_iterations(
    records: Sequence[dict[str, Any]],
    rng: np.random.Generator,
    limit: int | None = None,
    n: int = BEAM_N,
    beam_width: int = BEAM_WIDTH,
    max_iterations: int = BEAM_MAX_ITERATIONS,
) -> list[SearchCall]:
    """Rebuild the PRM calls of DVTS (diverse verifier tree search) from beam-search final beams.

    DVTS splits the `n` = 16 candidates into `n / beam_width` = 4 independent subtrees; at every
    iteration each subtree keeps its one best beam and extends it `beam_width` = 4 ways, and the 16
    candidates (whole prefix + new step) go to the PRM in one call. Subtrees share only the prompt, so
    prefixes are shared within groups of 4, not across the call as in beam search.

    Rebuilt from the trace: the subtree paths are 4 completions with different first steps where the
    problem has them (its most diverse final beams), else completions given a stand-in first step (so
    subtrees share nothing but the prompt); at iteration t each subtree sends its path's
    (t - 1)-step prefix extended by the path's own t-th step and by 3 stand-in steps drawn (seeded) from the
    traces' steps at depth t. A subtree whose path has ended stops, as a finished DVTS subtree does.
    """
    problems, pool = _problems_and_pool(records)
    everything = [s for steps in pool.values() for s in steps]
    subtrees = n // beam_width

    per_problem: list[tuple[str, list[list[list[str]]]]] = []
    total = 0
    for problem, completions in problems:
        by_first: dict[str, list[str]] = {}
        for steps in completions:
            by_first.setdefault(steps[0], steps)
        paths = list(by_first.values())[:subtrees]
        # Beam search's survivors often agree on their first step, DVTS's subtrees never share one: the
        # missing subtrees take other completions with a stand-in first step, so they diverge at once.
        others = [c for c in completions if c not in paths] or completions
        while len(paths) < subtrees:
            path = others[len(paths) % len(others)]
            paths.append([pool[0][int(rng.integers(len(pool[0])))], *path[1:]])
        iterations = min(max(len(p) for p in paths), max_iterations)
        calls: list[list[list[str]]] = []
        for t in range(1, iterations + 1):
            depth_pool = pool.get(t - 1) or everything
            call: list[list[str]] = []
            for path in paths:
                if len(path) < t:
                    continue
                parent = path[: t - 1]
                call.append(list(path[:t]))
                call += [[*parent, depth_pool[int(rng.integers(len(depth_pool)))]] for _ in range(beam_width - 1)]
            calls.append(call)
        if limit is not None and per_problem and total + len(calls) > limit:
            break
        per_problem.append((problem, calls))
        total += len(calls)
    return _iteration_major(per_problem)


def _unique(items: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return list(dict.fromkeys(items))


# --- synthetic -----------------------------------------------------------------------------------

# (mean, p90) from the data README's shape table, taking the middle of the ranges it gives.
BON_STEPS = (8.0, 12.5)  # steps per solution, search-and-learn Best-of-N N=16
BON_STEP_CHARS = (172.0, 325.0)  # chars per step, same traces
BEAM_STEPS = (10.4, 18.5)  # steps per final beam, search-and-learn beam search N=16
BEAM_STEP_CHARS = (107.0, 195.0)  # chars per step, same traces
PROBLEM_CHARS = (200.0, 400.0)  # MATH problem statements (order of magnitude; only the prompt's length)
MAX_STEPS = 58  # the longest Best-of-N completion in the traces, in steps

_WORDS = (
    "the so we then is of and to a in that for it with as by this from be are at on",
    "sum product equation value number term side both each total find solve let now first next",
    "since therefore thus hence we get substitute simplify multiply divide add subtract square root",
    "x y n k a b c = + - * / ( ) ^ < > \\frac \\sqrt $ answer boxed step check given area",
)
WORDS: tuple[str, ...] = tuple(w for line in _WORDS for w in line.split())


@dataclass(frozen=True)
class LogNormal:
    """A log-normal distribution fitted to a mean and a 90th percentile (heavy right tail, like the traces)."""

    mu: float
    sigma: float

    @staticmethod
    def fit(mean: float, p90: float) -> LogNormal:
        # mean = exp(mu + s^2 / 2), p90 = exp(mu + z s) with z = 1.2816: s^2 / 2 - z s + ln(p90 / mean) = 0,
        # the smaller root (the larger one has an absurd tail).
        z = 1.2815515655446004
        gap = math.log(p90 / mean)
        if gap <= 0 or z * z < 2 * gap:
            raise ValueError(f"no log-normal has mean {mean} and p90 {p90}")
        sigma = z - math.sqrt(z * z - 2 * gap)
        return LogNormal(math.log(mean) - sigma * sigma / 2, sigma)

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.lognormal(self.mu, self.sigma))


def random_text(rng: np.random.Generator, chars: int) -> str:
    """Random words (maths-flavoured English and numbers) of about `chars` characters."""
    words: list[str] = []
    length = 0
    while length < chars:
        word = str(int(rng.integers(0, 1000))) if rng.random() < 0.15 else WORDS[int(rng.integers(len(WORDS)))]
        words.append(word)
        length += len(word) + 1
    return " ".join(words) + "."


class _Sizes:
    def __init__(self, steps: tuple[float, float], chars: tuple[float, float], scale: float) -> None:
        if scale <= 0:
            raise ConfigError(f"the synthetic scale must be positive, got {scale}")
        self.steps = LogNormal.fit(*steps)
        self.chars = LogNormal.fit(*chars)
        self.problem = LogNormal.fit(*PROBLEM_CHARS)
        self.scale = scale

    def num_steps(self, rng: np.random.Generator) -> int:
        return int(min(MAX_STEPS, max(1, round(self.steps.sample(rng)))))

    def step(self, rng: np.random.Generator) -> str:
        return random_text(rng, max(4, round(self.chars.sample(rng) * self.scale)))

    def problem_text(self, rng: np.random.Generator) -> str:
        return random_text(rng, max(8, round(self.problem.sample(rng) * self.scale)))


def synthetic_best_of_n(
    count: int, rng: np.random.Generator, n: int = 16, scale: float = 1.0
) -> list[tuple[str, list[list[str]]]]:
    """`count` requests of `n` independent random completions (lengths as in the Best-of-N traces)."""
    sizes = _Sizes(BON_STEPS, BON_STEP_CHARS, scale)
    out = []
    for _ in range(count):
        problem = sizes.problem_text(rng)
        out.append((problem, [[sizes.step(rng) for _ in range(sizes.num_steps(rng))] for _ in range(n)]))
    return out


def synthetic_beam(
    count: int, rng: np.random.Generator, n: int = BEAM_N, beam_width: int = BEAM_WIDTH, scale: float = 1.0
) -> list[tuple[str, list[list[str]]]]:
    """`count` calls of simulated beam searches, iteration-major across problems.

    Each problem runs for a number of iterations drawn like the beam traces' step counts; every iteration
    sends `n` candidates: `n / beam_width` kept beams (chosen at random from the previous call), each
    extended by `beam_width` new random steps.
    """
    sizes = _Sizes(BEAM_STEPS, BEAM_STEP_CHARS, scale)
    keep = max(1, n // beam_width)
    searches: list[tuple[str, list[list[list[str]]]]] = []
    total = 0
    while total < count:
        problem = sizes.problem_text(rng)
        beams: list[list[str]] = [[] for _ in range(keep)]
        calls = []
        for _ in range(min(sizes.num_steps(rng), count - total)):
            candidates = [[*beams[j % keep], sizes.step(rng)] for j in range(n)]
            calls.append(candidates)
            chosen = rng.choice(len(candidates), size=keep, replace=False)
            beams = [candidates[int(i)] for i in chosen]
        searches.append((problem, calls))
        total += len(calls)
    out: list[tuple[str, list[list[str]]]] = []
    for t in range(max(len(c) for _, c in searches)):
        for problem, calls in searches:
            if t < len(calls):
                out.append((problem, calls[t]))
    return out


# --- the embedded model's arithmetic -------------------------------------------------------------


def arith_best_of_n(count: int, seed: int, n: int = ARITH_N) -> list[tuple[str, list[list[str]]]]:
    """`count` requests: an arithmetic problem and `n` chains sampled from the noisy policy (as `stepscore
    demo` searches)."""
    from stepscore.runtime.default_model.arith import make_problem, sample_chain

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        problem = make_problem(rng)
        out.append((problem.text, [sample_chain(problem, rng).steps for _ in range(n)]))
    return out


def arith_beam(count: int, seed: int, n: int = BEAM_N, beam_width: int = BEAM_WIDTH) -> list[SearchCall]:
    """`count` calls of beam searches over the arithmetic policy, iteration-major across problems.

    Iteration t sends `n` candidates: `n / beam_width` kept chains (chosen at random from the previous call:
    traffic, not search quality, is measured), each extended by `beam_width` next steps sampled from the
    policy, as whole prefix + new step, the way search-and-learn calls its PRM.
    """
    from stepscore.runtime.default_model.arith import make_problem, next_step

    rng = random.Random(seed)
    keep = max(1, n // beam_width)
    searches: list[tuple[str, list[list[list[str]]]]] = []
    total = 0
    while total < count:
        problem = make_problem(rng)
        beams: list[tuple[list[str], int]] = [([], problem.start)] * keep
        calls = []
        for k in range(min(len(problem.ops), count - total)):
            extended = []
            for j in range(n):
                steps, value = beams[j % keep]
                step, stated = next_step(problem, k, value, rng)
                extended.append(([*steps, step], stated))
            calls.append([steps for steps, _ in extended])
            beams = rng.sample(extended, keep)
        searches.append((problem.text, calls))
        total += len(calls)
    return _iteration_major(searches)
