"""Workloads: shapes of the requests built from the real traces and from the synthetic generator."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stepscore.errors import ConfigError
from stepscore.runtime.bench.workloads import (
    BEAM_MAX_ITERATIONS,
    BON_STEPS,
    LogNormal,
    default_data_dir,
    load_workload,
    processbench_best_of_n_workload,
    split_steps,
)
from stepscore.runtime.bench.workloads import _take_groups as take_groups
from stepscore.runtime.default_model.arith import Problem, verify
from stepscore.runtime.types import ScoreRequest, TokenIds


def _steps(request: ScoreRequest) -> list[list[str]]:
    return [list(c) for c in request.candidates if not isinstance(c, TokenIds)]


def test_split_steps_drops_empty() -> None:
    assert split_steps("a\n\nb\n\n\n\n  \n\nc\n\n") == ["a", "b", "c"]


def test_arith_workloads_are_the_embedded_models_own_traffic() -> None:
    bon = load_workload("arith", limit=20, seed=1)
    assert len(bon.requests) == 20 and all(len(r.candidates) == 8 for r in bon.requests)
    beam = load_workload("arith-beam", limit=30, seed=1)
    assert len(beam.requests) == 30 and all(len(r.candidates) == 16 for r in beam.requests)
    by_problem: dict[str, list[list[list[str]]]] = {}
    for r in beam.requests:
        by_problem.setdefault(r.problem, []).append(_steps(r))
    for calls in by_problem.values():
        for t, cands in enumerate(calls, start=1):
            assert {len(c) for c in cands} == {t}  # iteration t: whole prefix + one new step
            assert len({tuple(c[:-1]) for c in cands}) <= 4  # at most 4 kept beams, each extended
    # the chains are in the one format the embedded model knows, within its context: it tells the right
    # ones (checked against the problem its text names) from the wrong ones
    from stepscore.runtime.default_model import default_bundle
    from stepscore.runtime.engine import SyncEngine

    right: list[float] = []
    wrong: list[float] = []
    with SyncEngine(default_bundle()) as engine:
        for r in bon.requests[:6]:
            problem = _problem(r.problem)
            result = engine.score(r.problem, _steps(r))
            for chain, scored in zip(_steps(r), result.candidates, strict=True):
                assert scored.num_tokens <= 512
                (right if all(verify(problem, chain)) else wrong).append(min(scored.step_scores))
    assert len(right) >= 10 and len(wrong) >= 10
    # the model is good, not perfect (step AUROC 0.99): most chains on the right side of 0.5 (a sample of
    # a few problems, where one misjudged chain may be drawn several times)
    assert np.mean(np.array(right) > 0.5) >= 0.8 and np.mean(np.array(wrong) < 0.5) >= 0.8, (right, wrong)


def _problem(text: str) -> Problem:
    import re

    numbers = [int(x) for x in re.findall(r"\d+", text)]
    ops = re.findall(r"[+\-*]", text)
    return Problem(numbers[0], tuple(zip(ops, numbers[1:], strict=True)))


def test_no_built_in_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a ../shared/data beside the working directory used to be found on its own: now only --data or the
    # environment variable name the data
    (tmp_path / "shared" / "data" / "search_traces_sal").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("STEPSCORE_DATA", raising=False)
    assert default_data_dir() is None
    with pytest.raises(ConfigError, match=r"pass --data DIR .* or set STEPSCORE_DATA"):
        load_workload("bon16", limit=1)
    monkeypatch.setenv("STEPSCORE_DATA", str(tmp_path / "shared" / "data"))
    assert default_data_dir() == tmp_path / "shared" / "data"


def test_lognormal_fit_matches_mean_and_p90() -> None:
    d = LogNormal.fit(8.0, 12.5)
    assert math.exp(d.mu + d.sigma**2 / 2) == pytest.approx(8.0)
    assert math.exp(d.mu + 1.2815515655446004 * d.sigma) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        LogNormal.fit(10.0, 9.0)


def test_synthetic_best_of_n_shape_and_seed() -> None:
    w = load_workload("synthetic", limit=64, seed=3)
    assert len(w.requests) == 64 and all(len(r.candidates) == 16 for r in w.requests)
    steps = [len(c) for r in w.requests for c in _steps(r)]
    assert all(s.strip() for r in w.requests for c in _steps(r) for s in c)
    # the step count follows the Best-of-N traces' distribution (mean 8)
    assert abs(float(np.mean(steps)) - BON_STEPS[0]) < 1.0
    assert [r.request_id for r in w.requests[:2]] == ["synthetic-0", "synthetic-1"]
    again = load_workload("synthetic", limit=64, seed=3)
    assert [_steps(r) for r in again.requests] == [_steps(r) for r in w.requests]
    other = load_workload("synthetic", limit=64, seed=4)
    assert _steps(other.requests[0]) != _steps(w.requests[0])
    short = load_workload("synthetic", limit=8, seed=3, synthetic_scale=0.1)
    assert short.describe()["chars_per_candidate_mean"] < 0.3 * w.describe()["chars_per_candidate_mean"]


def test_synthetic_beam_shares_prefixes() -> None:
    w = load_workload("synthetic-beam", limit=40, seed=1, aggregates=("last",), truncate_left=True)
    assert len(w.requests) == 40
    by_problem: dict[str, list[list[list[str]]]] = {}
    for r in w.requests:
        assert len(r.candidates) == 16 and r.aggregates == ("last",) and r.truncate_left
        by_problem.setdefault(r.problem, []).append(_steps(r))
    for calls in by_problem.values():
        for t, cands in enumerate(calls, start=1):
            assert {len(c) for c in cands} == {t}  # iteration t: whole prefix + one new step
            parents = {tuple(c[:-1]) for c in cands}
            assert len(parents) <= 4 and len({c[-1] for c in cands}) == 16
            if t > 1:  # the parents are candidates of the previous iteration
                assert parents <= {tuple(c) for c in calls[t - 2]}


def test_unknown_workload_and_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown workload"):
        load_workload("nope")
    with pytest.raises(ConfigError, match="synthetic"):
        load_workload("bon16", tmp_path)
    with pytest.raises(ConfigError, match="synthetic"):
        load_workload("processbench", tmp_path)


# --- real traces (skipped without ../shared/data) ------------------------------------------------


def test_best_of_n(shared_data: Path) -> None:
    w = load_workload("bon16", shared_data, limit=6)
    assert len(w.requests) == 6 and all(len(r.candidates) == 16 for r in w.requests)
    # the files (two policies on the same MATH-500 problems) are interleaved: different completions
    assert len({tuple(map(tuple, _steps(r))) for r in w.requests}) == 6
    assert all(s.strip() and "\n\n" not in s for r in w.requests for c in _steps(r) for s in c)
    big = load_workload("bon256", shared_data, limit=1)
    assert len(big.requests) == 1 and len(big.requests[0].candidates) == 256


def test_processbench_one_solution_per_request(shared_data: Path) -> None:
    w = load_workload("processbench", shared_data, limit=8)
    assert all(len(r.candidates) == 1 for r in w.requests)
    with gzip.open(shared_data / "processbench" / "gsm8k.json.gz", "rt", encoding="utf-8") as fh:
        first = json.load(fh)[0]
    assert w.requests[0].problem == first["problem"] and _steps(w.requests[0])[0] == first["steps"]
    # the four subsets are interleaved, so a short run samples each of them
    assert len({r.problem for r in w.requests[:4]}) == 4


def test_beam_reconstruction(shared_data: Path) -> None:
    w = load_workload("beam", shared_data, limit=300)
    records = []
    for path in sorted((shared_data / "search_traces_sal").glob("*beam_search_N16*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh]
    # both traces searched the first MATH-500 problems: check the problems searched once
    seen = [r["problem"] for r in records]
    completions = {r["problem"]: [split_steps(c) for c in r["completions"]] for r in records if seen.count(r["problem"]) == 1}
    iteration: dict[str, int] = {}
    shared = checked = 0
    for r in w.requests:
        if r.problem not in completions:
            continue
        checked += 1
        t = iteration[r.problem] = iteration.get(r.problem, 0) + 1
        cands = _steps(r)
        assert len(cands) == 16
        if t < BEAM_MAX_ITERATIONS:
            assert {len(c) for c in cands} == {t}
        # every prefix that survives in the trace was scored at this iteration
        survivors = {tuple(s[:t]) for s in completions[r.problem] if len(s) >= t}
        assert survivors <= {tuple(c) for c in cands}
        parents = {tuple(c[:-1]) for c in cands}
        assert len(parents) <= 4  # the beams kept at the previous iteration
        if t > 1 and len(parents) < len(cands):
            shared += 1  # candidates at iteration t share their prefix with siblings
    assert checked > 20 and shared > checked // 2
    # iteration-major: the first requests are the first iterations of different problems
    assert all(len(c) == 1 for r in w.requests[:4] for c in _steps(r)) and len({r.problem for r in w.requests[:4]}) > 1


def test_best_of_n_groups_never_repeat_a_problem() -> None:
    items = [(p, TokenIds([i], [0])) for i, p in enumerate("aabcbcdd")]
    groups = list(take_groups(items, 3, None))
    assert [[p for p, _ in g] for g in groups] == [["a", "b", "c"], ["a", "b", "c"]]  # the d's wait, unmatched
    assert [[t.ids[0] for _, t in g] for g in groups] == [[0, 2, 3], [1, 4, 5]]
    assert len(list(take_groups(items, 3, 1))) == 1


def test_processbench_best_of_n_three_unrelated_solutions_in_range(shared_data: Path) -> None:
    # the embedded model's formatter (512-token context): lengths are counted in the given bundle's tokens
    from stepscore.runtime.bundle import load_bundle
    from stepscore.runtime.default_model import default_bundle
    from stepscore.runtime.formatting import Formatter

    bundle = load_bundle(default_bundle())
    m = bundle.manifest
    formatter = Formatter(m.format, bundle.tokenizer_path, m.model.vocab_size, m.model.max_seq_len)
    w = processbench_best_of_n_workload(shared_data, formatter, limit=6, min_tokens=200, max_tokens=400)
    assert len(w.requests) == 6 and w.name == "pb-bon3"
    for r in w.requests:
        assert len(r.candidates) == 3 and r.aggregates == ("min",)
        for cand in r.candidates:
            assert isinstance(cand, TokenIds) and 200 <= len(cand.ids) <= 400
            # the ids are what the formatter makes of one solution: the engine takes them unchanged
            (item,) = formatter.format_request(ScoreRequest(problem="", candidates=[cand]))
            assert item.ids.tolist() == list(cand.ids) and item.reads.tolist() == list(cand.step_positions)
    again = processbench_best_of_n_workload(shared_data, formatter, limit=6, min_tokens=200, max_tokens=400)
    assert [[list(c.ids) for c in r.candidates if isinstance(c, TokenIds)] for r in again.requests] == [
        [list(c.ids) for c in r.candidates if isinstance(c, TokenIds)] for r in w.requests
    ]
    with pytest.raises(ConfigError, match="token range"):
        processbench_best_of_n_workload(shared_data, formatter, min_tokens=600, max_tokens=300)
