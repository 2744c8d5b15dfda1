"""Quality measures of a PRM on the arithmetic task (numpy only): step AUROC, first-error accuracy,
and best-of-N selection against majority vote and random choice."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stepscore.runtime.default_model.arith import Chain, Problem, majority_vote, make_problem, sample_chain

# scores for a batch of (problem, chains): one array of step scores per chain
Scorer = Callable[[Sequence[tuple[Problem, Sequence[Chain]]]], list[list[npt.NDArray[np.float64]]]]


def auroc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks over ties
        tie = allv == v
        ranks[tie] = ranks[tie].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Quality:
    step_auroc: float
    first_error_accuracy: float
    chains: int
    steps: int


@dataclass(frozen=True)
class BestOfN:
    n: int
    problems: int
    prm_min: float
    majority: float
    random_pick: float
    oracle: float  # at least one of the N chains is right


def held_out(seed: int, problems: int, per_problem: int, p_error: float = 0.5) -> list[tuple[Problem, list[Chain]]]:
    rng = random.Random(seed)
    out = []
    for i in range(problems):
        problem = make_problem(rng)
        out.append((problem, [sample_chain(problem, rng, p_error, trap=seed * 100_003 + i) for _ in range(per_problem)]))
    return out


def step_quality(data: Sequence[tuple[Problem, Sequence[Chain]]], scorer: Scorer, threshold: float = 0.5) -> Quality:
    scores = scorer(data)
    flat_s, flat_l, hits, total = [], [], 0, 0
    for (_, chains), chain_scores in zip(data, scores, strict=True):
        for chain, s in zip(chains, chain_scores, strict=True):
            flat_s.append(s)
            flat_l.append(np.array(chain.labels))
            below = np.flatnonzero(s < threshold)
            predicted = int(below[0]) if below.size else -1
            hits += predicted == chain.first_error
            total += 1
    all_s, all_l = np.concatenate(flat_s), np.concatenate(flat_l)
    return Quality(auroc(all_s, all_l), hits / total, total, int(all_s.size))


def best_of_n(data: Sequence[tuple[Problem, Sequence[Chain]]], scorer: Scorer, seed: int = 0) -> BestOfN:
    rng = random.Random(seed)
    scores = scorer(data)
    prm = maj = rnd = oracle = 0
    for (problem, chains), chain_scores in zip(data, scores, strict=True):
        mins = [float(s.min()) for s in chain_scores]
        prm += chains[int(np.argmax(mins))].final == problem.answer
        maj += majority_vote(chains, rng).final == problem.answer
        rnd += rng.choice(chains).final == problem.answer
        oracle += any(c.final == problem.answer for c in chains)
    n = len(data)
    return BestOfN(len(data[0][1]), n, prm / n, maj / n, rnd / n, oracle / n)
