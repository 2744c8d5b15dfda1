"""`StepscoreRewardModelCaller` against a live server of the embedded default model.

OpenR's contract, re-stated from its source (openreasoner/openr, reason/inference/rm_call.py and
reason/guided_search/tree.py):

- `RewardModelCallingFunction(config)` with `config.step_tag` and `config.format_str`;
- `rm_call(question_answer_pairs, lm_step_tag)`: one `(question, answer)` tuple -> a list of step rewards, a
  list of tuples -> a list of such lists, in order; the answer's steps are its pieces between `lm_step_tag`s,
  stripped, empty ones dropped (`replace_step_tag`);
- the tree search expands a node by scoring `(question, node_answer + action)` for each of its legal actions
  in one call, checks that each list has one reward per action taken, and takes the last as the child's value.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from stepscore.integrations.openr import StepscoreRewardModelCaller, answer_steps
from stepscore.runtime.client import Client
from stepscore.runtime.default_model.arith import Problem, next_step, verify
from tests.integrations.conftest import Live


@dataclass
class RewardModelBaseConfig:
    """OpenR's reward-model config (the math-shepherd step tag and its format string)."""

    step_tag: str = "ки\n"
    format_str: str = "{question} {answer}"


def test_answer_steps_follow_replace_step_tag() -> None:
    assert answer_steps("2+3=5\n\n5*4=20\n\n", "\n\n") == ["2+3=5", "5*4=20"]
    assert answer_steps(" 2+3=5 ки\n5*4=20ки\n", "ки\n") == ["2+3=5", "5*4=20"]  # pieces are stripped
    assert answer_steps("2+3=5\n\n\n\n \n\n5*4=20", "\n\n") == ["2+3=5", "5*4=20"]  # empty pieces dropped
    assert answer_steps("", "\n\n") == []
    with pytest.raises(ValueError):
        answer_steps("a", "")


def test_the_call_contract(live: Live) -> None:
    with StepscoreRewardModelCaller(RewardModelBaseConfig(), live.target) as rm_call, Client(live.target) as client:
        assert rm_call.step_tag == "ки\n" and rm_call.format_str == "{question} {answer}"
        one = rm_call(("(2+3)*4", "2+3=5\n\n5*4=20\n\n"), lm_step_tag="\n\n")
        assert isinstance(one, list) and len(one) == 2 and all(isinstance(r, float) for r in one)
        pairs = [
            ("(2+3)*4", "2+3=5\n\n5*4=25\n\n"),
            ("(3+4)*2", "3+4=7\n\n"),
            ("(2+3)*4", ""),  # no step yet: no reward (OpenR's tree scores it 0)
            ("(2+3)*4", "2+3=5\n\n5*4=20"),
        ]
        many = rm_call(pairs, "\n\n")
        assert [len(r) for r in many] == [2, 1, 0, 2]
        assert many[3] == pytest.approx(one, abs=1e-6)
        for (question, answer), rewards in zip(pairs, many, strict=True):
            if rewards:
                expected = client.score(question, [answer_steps(answer, "\n\n")]).candidates[0].step_scores
                assert rewards == pytest.approx(expected, abs=1e-6)
        assert min(one) > 0.9 and many[0][1] < 0.1  # the wrong second step is low
        assert rm_call.usage.calls == 3  # one call per question of each rm_call


@dataclass
class Node:
    """OpenR's LanguageNode, what its beam search uses: the answer so far and its value."""

    answer: str
    value: int
    actions: list[str] = field(default_factory=list)
    reward: float = 0.0


def tree_beam_search(
    problem: Problem,
    rm_call_fn: Callable[[list[tuple[str, str]]], list[list[float]]],
    beam_size: int,
    width: int,
    rng: random.Random,
) -> list[Node]:
    """OpenR's `SearchTree.beam_search` over the arithmetic policy: each kept node is expanded by `width`
    sampled actions (a step and the LM's step tag), all scored in one `rm_call_fn` call, the child's value its
    last reward; the `beam_size` best children are kept, depth after depth."""
    kept = [Node("", problem.start)]
    for depth in range(len(problem.ops)):
        children: list[Node] = []
        for node in kept:
            actions = []
            for _ in range(width):
                step, value = next_step(problem, depth, node.value, rng, p_error=0.4)
                actions.append((step + "\n\n", value))
            rewards = rm_call_fn([(problem.text, node.answer + action) for action, _ in actions])
            for (action, value), rs in zip(actions, rewards, strict=True):
                assert len(rs) == depth + 1  # OpenR warns and scores 0 otherwise: one reward per action taken
                children.append(Node(node.answer + action, value, [*node.actions, action.strip()], rs[-1]))
        kept = sorted(children, key=lambda c: c.reward, reverse=True)[:beam_size]
    return kept


def test_a_tree_search_pays_only_for_new_steps(live: Live) -> None:
    problem = Problem(6, (("-", 2), ("*", 5), ("+", 7), ("-", 3)))  # (6-2)*5+7-3: 4, 20, 27, 24
    hits_before = live.cache_hits()
    with StepscoreRewardModelCaller(RewardModelBaseConfig(), live.target, search_prefix="test-openr-") as rm_call:
        rm_call_fn = functools.partial(rm_call, lm_step_tag="\n\n")  # as reason/evaluation/methods.py binds it
        calls_per_depth: list[tuple[int, int]] = []

        def counted(pairs: list[tuple[str, str]]) -> list[list[float]]:
            before = rm_call.usage.cached_tokens
            rewards = rm_call_fn(pairs)
            calls_per_depth.append((len(pairs[0][1].split("\n\n")) - 1, rm_call.usage.cached_tokens - before))
            return rewards

        best = tree_beam_search(problem, counted, beam_size=2, width=3, rng=random.Random(5))[0]
        assert verify(problem, best.actions) == [True] * 4, best.actions
        # depth 1 computes its steps; every deeper call finds its node's answer in the cache
        assert calls_per_depth[0] == (1, 0)
        assert all(hits > 0 for depth, hits in calls_per_depth if depth > 1), calls_per_depth
        assert live.cache_hits() - hits_before == rm_call.usage.cached_tokens
        with Client(live.target) as client:
            again = client.score(problem.text, [best.actions], search_id=rm_call.search_id(problem.text)).candidates[0]
        assert again.cached_tokens == again.num_tokens
        assert rm_call.end() > 0
