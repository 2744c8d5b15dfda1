"""`StepscorePRM` against a live server of the embedded default model.

search-and-learn is not on the package index, so its contract is re-stated here from its source
(huggingface/search-and-learn, src/sal/models/reward_models.py and src/sal/search/beam_search.py):

- `PRM(search_config, **kwargs)`; `score(questions, outputs)` with `len(questions) == len(outputs)`, each
  `outputs[i]` a list of completions of `questions[i]`;
- the result is per question, per completion, per step, in the order given; steps are separated by "\\n\\n";
- beam search calls `score(prompts, completions)` with one entry per beam (the prompt repeated, `[current_text]`
  each), `current_text` growing by one "\\n\\n"-terminated step per iteration (the last one generated to EOS),
  and keeps the `n // beam_width` beams of best aggregated score (`agg_strategy`, "last" by default).
"""

from __future__ import annotations

import copy
import math
import pickle
import random
from dataclasses import dataclass, field

import pytest

from stepscore.integrations.search_and_learn import StepscorePRM
from stepscore.runtime.client import Client
from stepscore.runtime.default_model.arith import Problem, next_step, verify
from tests.integrations.conftest import Live

PROBLEM = "(2+3)*4"


@dataclass
class Config:
    """The fields of search-and-learn's `Config` that its beam search reads."""

    n: int = 4
    beam_width: int = 2
    agg_strategy: str = "last"
    system_prompt: str = "Solve the following math problem efficiently and clearly"
    prm_batch_size: int = 4


def test_the_contract_shapes_order_and_steps(live: Live) -> None:
    questions = [PROBLEM, "(3+4)*2", PROBLEM]
    outputs = [
        ["2+3=5\n\n5*4=20", "2+3=6\n\n6*4=24\n\n"],  # a trailing separator adds no step
        ["3+4=7\n\n7*2=14\n\n", "", "3+4=7"],  # an empty completion is one (empty) step
        ["2+3=5\n\n\n\n5*4=20", "2+3=5\n\n5*4=25"],  # an empty step between two is scored as a step
    ]
    with StepscorePRM(Config(), live.target) as prm, Client(live.target) as client:
        scores = prm.score(questions, outputs)
        assert [[len(steps) for steps in per] for per in scores] == [[2, 2], [2, 1, 1], [3, 2]]
        # each completion's scores are the server's for exactly its steps, at its place
        for q, outs, per in zip(questions, outputs, scores, strict=True):
            expected = client.score(q, [prm_steps(o) for o in outs])
            for got, want in zip(per, expected.candidates, strict=True):
                assert got == pytest.approx(want.step_scores, abs=1e-6)
        right, wrong = scores[0]
        assert min(right) > 0.9 and max(wrong) < 0.1  # the model, not noise
        assert scores[2][1][0] > 0.9 and scores[2][1][1] < 0.1
        assert prm.score([], []) == []
        assert prm.score([PROBLEM], [[]]) == [[]]  # a question without completions: no call
        with pytest.raises(ValueError, match="2 questions but 1"):
            prm.score([PROBLEM, PROBLEM], [["2+3=5"]])
    assert prm.search_config == Config() and prm.model is None  # the base class's attributes


def prm_steps(text: str) -> list[str]:
    steps = text.split("\n\n")
    return steps[:-1] if len(steps) > 1 and steps[-1] == "" else steps


@dataclass
class Beam:
    """search-and-learn's Beam, the fields its beam search uses (plus the policy's running value)."""

    prompt: str
    current_text: str = ""
    value: int = 0
    history: list[str] = field(default_factory=list)
    all_scores: list[float] = field(default_factory=list)
    pruned: bool = False
    completed: bool = False


def aggregate_scores(scores: list[float], strategy: str) -> float:
    """search-and-learn's sal.utils.score.aggregate_scores."""
    return {"last": scores[-1], "min": min(scores), "prod": math.prod(scores)}[strategy]


def beam_search(
    problem: Problem, config: Config, prm: StepscorePRM, rng: random.Random, on_iteration: list[float]
) -> list[Beam]:
    """search-and-learn's `_beam_search` for one prompt, with the arithmetic policy as the LLM: each beam gets
    one sampled step per iteration, the PRM scores every beam's whole text, the best n // beam_width survive and
    are duplicated back to n. `on_iteration` gets the server's cache hits (prm.usage) after each iteration."""
    beams = [Beam(problem.text, value=problem.start) for _ in range(config.n)]
    iterations = len(problem.ops)
    completed: list[Beam] = []
    active = beams
    for i in range(iterations):
        active = [b for b in active if not b.pruned]
        if len(active) != config.n:
            active = [copy.deepcopy(b) for b in (active * (config.n // len(active) + 1))[: config.n]]
        prompts, completions = [], []
        for beam in active:
            step, beam.value = next_step(problem, i, beam.value, rng, p_error=0.4)
            last = i == iterations - 1
            text = step if last else step + "\n\n"  # stop="\n\n" is kept; the last iteration runs to EOS
            beam.current_text += text
            beam.history.append(step)
            beam.completed = last
            if last:
                completed.append(beam)
            prompts.append(beam.prompt)
            completions.append([beam.current_text])
        scores = prm.score(prompts, completions)
        on_iteration.append(prm.usage.cached_tokens)
        for beam, score in zip(active, scores, strict=True):
            assert len(score) == 1 and len(score[0]) == i + 1  # one score per step so far
            beam.all_scores = score[0]
        agg = [aggregate_scores(s[0], config.agg_strategy) for s in scores]
        active_left = [(a, b) for a, b in zip(agg, active, strict=True) if not b.completed]
        if not active_left:
            break
        keep = sorted(range(len(active_left)), key=lambda k: active_left[k][0])[-(config.n // config.beam_width) :]
        for k, (_, beam) in enumerate(active_left):
            beam.pruned = k not in keep
        active = [b for _, b in active_left]
    return sorted(completed, key=lambda b: aggregate_scores(b.all_scores, config.agg_strategy), reverse=True)


def test_a_beam_search_pays_only_for_new_steps(live: Live) -> None:
    problem = Problem(7, (("+", 2), ("*", 3), ("-", 5), ("+", 4)))  # (7+2)*3-5+4: 4 steps, 9 27 22 26
    config = Config()
    hits_before = live.cache_hits()
    cached: list[float] = []
    with StepscorePRM(config, live.target, search_prefix="test-beam-") as prm:
        best = beam_search(problem, config, prm, random.Random(3), cached)[0]
        search_id = prm.search_id(problem.text)
        assert search_id.startswith("test-beam-")

        # the PRM steered the search: the best completed beam is right at every step
        assert verify(problem, best.history) == [True] * 4, best.history
        assert best.current_text == "\n\n".join(problem.solution())

        # iteration 1 computes everything; from iteration 2 on, every beam's earlier steps come from the cache
        assert cached[0] == 0
        per_iteration = [b - a for a, b in zip([0.0, *cached], cached, strict=False)]
        assert all(hit > 0 for hit in per_iteration[1:]), per_iteration
        assert prm.usage.calls == 4 and prm.usage.candidates == 4 * config.n
        # the server counted the same hits (nothing else used it meanwhile)
        assert live.cache_hits() - hits_before == prm.usage.cached_tokens

        # the search's whole best chain is in the cache under its search id
        with Client(live.target) as client:
            again = client.score(problem.text, [best.history], search_id=search_id).candidates[0]
        assert again.cached_tokens == again.num_tokens > 0
        assert again.step_scores == pytest.approx(best.all_scores, abs=1e-6)

        assert prm.end([problem.text]) > 0  # the search is over: its entries are freed
        assert prm.end() == 0  # nothing left to end


def test_several_questions_in_one_call_each_keep_their_own_search(live: Live) -> None:
    """A best-of-n batch (search_batch_size > 1): entries of two questions interleaved, one call per question."""
    a, b = "(4+1)*3", "(6+2)*5"
    with StepscorePRM(None, live.target, search_prefix="test-two-") as prm:
        first = prm.score([a, b, a], [["4+1=5\n\n"], ["6+2=8\n\n"], ["4+1=6\n\n"]])
        assert prm.usage.calls == 2  # one per question, whatever the number of entries
        second = prm.score([b, a], [["6+2=8\n\n8*5=40"], ["4+1=5\n\n5*3=15"]])
        assert second[0][0][0] == pytest.approx(first[1][0][0], abs=1e-6)
        assert second[1][0][0] == pytest.approx(first[0][0][0], abs=1e-6)
        assert prm.usage.cached_tokens > 0  # each question's first step came from its search's cache
        assert prm.search_id(a) != prm.search_id(b)
        assert prm.end() > 0


def test_the_prm_survives_pickling_as_datasets_map_does_it(live: Live) -> None:
    """search-and-learn passes the PRM to `datasets.map(fn_kwargs={"prm": prm})`, which pickles it (to hash it,
    and to send it to each process with num_proc > 1): the copy connects on its own."""
    with StepscorePRM(Config(), live.target, search_prefix="test-pickle-") as prm:
        before = prm.score([PROBLEM], [["2+3=5"]])
        copy_ = pickle.loads(pickle.dumps(prm))
        assert copy_.score([PROBLEM], [["2+3=5"]]) == before
        assert copy_.search_id(PROBLEM) == prm.search_id(PROBLEM) and copy_.search_config == Config()
        copy_.close()


def test_many_completions_of_one_question_are_chunked_in_order(live: Live) -> None:
    outputs = ["2+3=5\n\n5*4=20", "2+3=6", "2+3=5\n\n5*4=25", "2+3=5", "2+3=4\n\n4*4=16"]
    with StepscorePRM(None, live.target, search_prefix="test-chunk-", chunk=2) as prm:
        chunked = prm.score([PROBLEM, PROBLEM], [outputs[:3], outputs[3:]])
        assert prm.usage.calls == 3  # 5 completions of one question, 2 a call
    with StepscorePRM(None, live.target, search_prefix="test-whole-") as whole:
        assert chunked == [
            [pytest.approx(s, abs=1e-6) for s in per] for per in whole.score([PROBLEM, PROBLEM], [outputs[:3], outputs[3:]])
        ]
        assert whole.usage.calls == 1
