"""search-and-learn's beam search with its PRM served by stepscore.

The one-line change in search-and-learn (scripts/test_time_compute.py):

    prm = load_prm(config)                          # before: the PRM in-process, PyTorch eager
    prm = StepscorePRM(config, "127.0.0.1:50051")   # after: a `stepscore serve` scores the steps

This example runs search-and-learn's beam-search loop (src/sal/search/beam_search.py, condensed) with the
embedded default model's arithmetic policy standing in for the LLM, against `stepscore serve` (no bundle: the
embedded model). Each iteration re-sends every beam's whole text, as search-and-learn does; the server's prefix
cache computes only the new step. Run: `stepscore serve &` then `python examples/search_and_learn_beam.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from dataclasses import dataclass, field

from stepscore.integrations.search_and_learn import StepscorePRM
from stepscore.runtime.default_model.arith import Problem, make_problem, next_step, verify


@dataclass
class Config:
    """The fields of search-and-learn's Config that its beam search reads."""

    n: int = 8
    beam_width: int = 2
    agg_strategy: str = "last"


@dataclass
class Beam:
    prompt: str
    value: int
    current_text: str = ""
    history: list[str] = field(default_factory=list)
    all_scores: list[float] = field(default_factory=list)
    pruned: bool = False


def beam_search(problem: Problem, config: Config, prm: StepscorePRM, rng: random.Random) -> Beam:
    active = [Beam(problem.text, problem.start) for _ in range(config.n)]
    for i in range(len(problem.ops)):
        active = [b for b in active if not b.pruned]
        active = [copy.deepcopy(b) for b in (active * config.n)[: config.n]]  # back to n beams
        last = i == len(problem.ops) - 1
        for beam in active:  # the "LLM" writes one step, ending with the stop string "\n\n" (kept)
            step, beam.value = next_step(problem, i, beam.value, rng, p_error=0.4)
            beam.current_text += step if last else step + "\n\n"
            beam.history.append(step)
        scores = prm.score([b.prompt for b in active], [[b.current_text] for b in active])
        for beam, score in zip(active, scores, strict=True):
            beam.all_scores = score[0]
        ranked = sorted(active, key=lambda b: b.all_scores[-1])  # agg_strategy "last"
        for beam in ranked[: -(config.n // config.beam_width)]:
            beam.pruned = True
    return max(active, key=lambda b: b.all_scores[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="search-and-learn beam search scored by stepscore")
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="a `stepscore serve` address")
    parser.add_argument("--problems", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    problems = [make_problem(rng, 3, 4) for _ in range(args.problems)]
    right = 0
    with StepscorePRM(Config(), args.target, search_prefix="example-sal-") as prm:
        for problem in problems:
            best = beam_search(problem, Config(), prm, rng)
            ok = all(verify(problem, best.history))
            right += ok
            scores = ", ".join(f"{s:.3f}" for s in best.all_scores)
            print(f"{problem.text}: {' | '.join(best.history)}  [{scores}]  {'right' if ok else 'wrong'}")
        prm.end()  # the searches are over: free their cache entries
        usage = prm.usage
    share = usage.cached_tokens / usage.tokens
    print(f"{usage.calls} calls, {usage.tokens} tokens scored, {share:.0%} of them from the prefix cache")
    print(json.dumps({"problems": len(problems), "right": right, "cached_share": round(share, 3)}))


if __name__ == "__main__":
    main()
