"""The arithmetic task: problems, the noisy policy and the step verifier."""

from __future__ import annotations

import random

from stepscore.runtime.default_model.arith import (
    Chain,
    Problem,
    majority_vote,
    make_problem,
    sample_chain,
    sample_training_chain,
    verify,
)


def test_problem_rendering_and_solution() -> None:
    p = Problem(17, (("+", 5), ("*", 3), ("-", 8)))
    assert p.expression == "(17+5)*3-8"
    assert p.solution() == ["17+5=22", "22*3=66", "66-8=58"]
    assert p.answer == 58


def test_verifier_labels_the_first_error_and_everything_after() -> None:
    p = Problem(17, (("+", 5), ("*", 3), ("-", 8)))
    assert verify(p, p.solution()) == [True, True, True]
    assert verify(p, ["17+5=22", "22*3=67", "67-8=59"]) == [True, False, False]  # wrong result, carried
    assert verify(p, ["17+6=23", "23*3=69", "69-8=61"]) == [False, False, False]  # wrong operand
    assert verify(p, ["17+5=22", "22*3=66", "66-8=58", "58+1=59"]) == [True, True, True, False]  # extra step
    assert verify(p, ["17+5=22", "what"]) == [True, False]
    assert verify(p, ["17+5=22"]) == [True]  # a right partial chain stays right (beam search scores prefixes)


def test_policy_plants_one_error_at_a_known_step() -> None:
    rng = random.Random(0)
    wrong = 0
    for _ in range(500):
        p = make_problem(rng)
        chain = sample_chain(p, rng, p_error=0.5, trap=7)
        assert chain.labels == verify(p, chain.steps)
        if chain.first_error < 0:
            assert chain.steps == p.solution() and chain.final == p.answer
        else:
            wrong += 1
            assert not chain.labels[chain.first_error] and all(chain.labels[: chain.first_error])
            assert all(not x for x in chain.labels[chain.first_error :])
    assert 150 < wrong < 350


def test_training_chains_can_hold_several_errors() -> None:
    rng = random.Random(1)
    chains = [sample_training_chain(make_problem(rng), rng, 0.5) for _ in range(200)]
    assert any(sum(not x for x in c.labels) >= 2 for c in chains)


def test_majority_vote() -> None:
    def chain(answer: int) -> Chain:
        return Chain([f"1+{answer - 1}={answer}"], [True], -1)

    rng = random.Random(0)
    assert majority_vote([chain(3), chain(5), chain(3)], rng).final == 3
