"""A PRM reward for TRL's GRPOTrainer, served by stepscore.

The one-line change in a TRL GRPO script:

    trainer = GRPOTrainer(model=..., reward_funcs=[StepRewardFunction("127.0.0.1:50051", aggregate="min")], ...)

This example makes the call GRPOTrainer makes for each batch (trl/trainer/grpo_trainer.py,
`_calculate_rewards`: `reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns)`) on a
GRPO batch of the embedded default model's arithmetic problems, a group of sampled solutions per prompt, with
conversational prompts and completions as a chat dataset gives them, and prints each completion's reward: the
minimum of its step scores. Run: `stepscore serve &` then `python examples/trl_grpo_reward.py`.
"""

from __future__ import annotations

import argparse
import json
import random

from stepscore.integrations.trl import StepRewardFunction
from stepscore.runtime.default_model.arith import make_problem, sample_chain


def main() -> None:
    parser = argparse.ArgumentParser(description="a TRL GRPO reward scored by stepscore")
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="a `stepscore serve` address")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (num_generations)")
    args = parser.parse_args()
    rng = random.Random(2)
    prompts, completions, answers, right = [], [], [], []
    for _ in range(args.prompts):
        problem = make_problem(rng, 2, 4)
        for _ in range(args.group):  # GRPOTrainer repeats each prompt once per generation
            chain = sample_chain(problem, rng, p_error=0.5)
            prompts.append([{"role": "user", "content": problem.text}])
            completions.append([{"role": "assistant", "content": "\n\n".join(chain.steps)}])
            answers.append(problem.answer)
            right.append(chain.first_error == -1)

    reward = StepRewardFunction(args.target, aggregate="min")
    completion_ids = [[0] * len(c[0]["content"]) for c in completions]  # token ids: unused by a PRM reward
    rewards = reward(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answers)
    reward.close()

    for prompt, completion, r, ok in zip(prompts, completions, rewards, right, strict=True):
        steps = completion[0]["content"].replace("\n\n", " | ")
        print(f"{prompt[0]['content']}: {steps}  reward {r:.3f}  {'right' if ok else 'wrong'}")
    # a good PRM reward separates right from wrong completions: GRPO's advantages come from that gap
    mean_right = sum(r for r, ok in zip(rewards, right, strict=True) if ok) / max(1, sum(right))
    mean_wrong = sum(r for r, ok in zip(rewards, right, strict=True) if not ok) / max(1, len(right) - sum(right))
    print(f"{reward.__name__}: mean reward {mean_right:.3f} for right completions, {mean_wrong:.3f} for wrong ones")
    print(json.dumps({"completions": len(rewards), "mean_right": round(mean_right, 3), "mean_wrong": round(mean_wrong, 3)}))


if __name__ == "__main__":
    main()
