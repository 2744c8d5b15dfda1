"""OpenR's tree beam search with its reward model served by stepscore.

The one-line change in OpenR (reason/evaluation/evaluate.py):

    rm_call = RMRemoteCaller(rm_config)                                  # before: a FastChat PRM worker
    rm_call = StepscoreRewardModelCaller(rm_config, "127.0.0.1:50051")   # after: a `stepscore serve`

This example runs OpenR's beam search (reason/guided_search/tree.py, `SearchTree.beam_search`, condensed): each
kept node is expanded by a few sampled actions, all scored in one `rm_call` (bound to the LM's step tag with
functools.partial, as reason/evaluation/methods.py does), each child valued by its last step reward. The
embedded default model's arithmetic policy stands in for the LLM. Run: `stepscore serve &` then
`python examples/openr_beam.py`.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from stepscore.integrations.openr import StepscoreRewardModelCaller
from stepscore.runtime.default_model.arith import Problem, make_problem, next_step, verify

LM_STEP_TAG = "\n\n"  # what OpenR's evaluate.py sets for a Qwen policy
RewardFn = Callable[[list[tuple[str, str]]], list[list[float]]]  # rm_call with the LM's step tag bound


@dataclass
class RewardModelConfig:
    """OpenR's RemoteRewardModelConfig, the fields its callers read (the PRM's own tag: the bundle's business)."""

    step_tag: str = "ки\n"
    format_str: str = "{question} {answer}"


@dataclass
class Node:
    answer: str
    value: int
    actions: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


def beam_search(problem: Problem, rm_call_fn: RewardFn, beam_size: int, width: int, rng: random.Random) -> Node:
    kept = [Node("", problem.start)]
    for depth in range(len(problem.ops)):
        children = []
        for node in kept:
            actions = [next_step(problem, depth, node.value, rng, p_error=0.4) for _ in range(width)]
            pairs = [(problem.text, node.answer + step + LM_STEP_TAG) for step, _ in actions]
            for (step, value), (_, answer), rs in zip(actions, pairs, rm_call_fn(pairs), strict=True):
                children.append(Node(answer, value, [*node.actions, step], rs))
        kept = sorted(children, key=lambda c: c.rewards[-1], reverse=True)[:beam_size]  # "prm-last"
    return kept[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenR beam search scored by stepscore")
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="a `stepscore serve` address")
    parser.add_argument("--problems", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(1)
    problems = [make_problem(rng, 3, 4) for _ in range(args.problems)]
    right = 0
    with StepscoreRewardModelCaller(RewardModelConfig(), args.target, search_prefix="example-openr-") as rm_call:
        rm_call_fn = functools.partial(rm_call, lm_step_tag=LM_STEP_TAG)
        for problem in problems:
            best = beam_search(problem, rm_call_fn, beam_size=2, width=4, rng=rng)
            ok = all(verify(problem, best.actions))
            right += ok
            rewards = ", ".join(f"{r:.3f}" for r in best.rewards)
            print(f"{problem.text}: {' | '.join(best.actions)}  [{rewards}]  {'right' if ok else 'wrong'}")
        rm_call.end()  # the searches are over: free their cache entries
        usage = rm_call.usage
    share = usage.cached_tokens / usage.tokens
    print(f"{usage.calls} calls, {usage.tokens} tokens scored, {share:.0%} of them from the prefix cache")
    print(json.dumps({"problems": len(problems), "right": right, "cached_share": round(share, 3)}))


if __name__ == "__main__":
    main()
