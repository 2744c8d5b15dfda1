"""`StepRewardFunction` called exactly as TRL's `GRPOTrainer` calls a reward function, against a live server.

TRL's call, re-stated from its source (trl 1.16.0, trl/trainer/grpo_trainer.py, `_calculate_rewards`):

    reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **reward_kwargs)

`reward_kwargs`: every other dataset column (one value per completion), `trainer_state`, `log_extra`,
`log_metric`; the result: one float (or None) per completion. Prompts and completions are strings, or lists of
`{"role", "content"}` messages for a conversational dataset (a completion `[{"role": "assistant", ...}]`). A
callable instance is named by its `__name__` when it has one (`get_callable_name`), and may be pickled.
trl is not imported here (it needs torch): the test makes the call TRL makes.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from stepscore.integrations.trl import AGGREGATES, StepRewardFunction, completion_text, prompt_text
from stepscore.runtime.aggregates import aggregate
from stepscore.runtime.client import Client
from stepscore.runtime.types import AGGREGATES as SERVER_AGGREGATES
from tests.integrations.conftest import Live

# a GRPO batch: two prompts, a group of three completions each (TRL repeats each prompt per completion)
PROBLEMS = ["(2+3)*4"] * 3 + ["(3+4)*2"] * 3
COMPLETIONS = [
    "2+3=5\n\n5*4=20",
    "2+3=6\n\n6*4=24",
    "2+3=5\n\n5*4=25\n\n",
    "3+4=7\n\n7*2=14",
    "3+4=8\n\n8*2=16",
    "3+4=7",
]


def trl_call(func: Any, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    """What GRPOTrainer._calculate_rewards does for a plain reward function."""
    logged: list[tuple[str, Any]] = []
    reward_kwargs: dict[str, Any] = {key: list(value) for key, value in columns.items()}
    reward_kwargs["trainer_state"] = object()
    reward_kwargs["log_extra"] = lambda name, values: logged.append((name, values))
    reward_kwargs["log_metric"] = lambda name, value: logged.append((name, value))
    completion_ids = [[ord(ch) for ch in completion_text(c)] for c in completions]
    out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
    assert isinstance(out, list) and len(out) == len(prompts)
    assert all(isinstance(r, float) for r in out)
    return out


def test_the_signature_and_aggregates_match_trl_and_the_server() -> None:
    assert AGGREGATES == SERVER_AGGREGATES
    with pytest.raises(ValueError, match="unknown aggregate"):
        StepRewardFunction(aggregate="prod")
    func = StepRewardFunction("127.0.0.1:1", aggregate="last")
    assert func.__name__ == "stepscore_last"
    copy = pickle.loads(pickle.dumps(func))  # picklable before and after a client exists
    assert copy.aggregate == "last" and copy.__name__ == "stepscore_last"


def test_conversational_prompts_and_completions_are_read() -> None:
    conversation = [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "(2+3)*4"}]
    assert prompt_text(conversation) == "(2+3)*4"
    assert prompt_text([{"role": "user", "content": [{"type": "text", "text": "(2+3)*4"}]}]) == "(2+3)*4"
    assert completion_text([{"role": "assistant", "content": "2+3=5\n\n5*4=20"}]) == "2+3=5\n\n5*4=20"
    assert completion_text([{"role": "assistant", "content": "2+3=5"}, {"role": "assistant", "content": "5*4=20"}]) == (
        "2+3=5\n\n5*4=20"  # each assistant turn ends a step
    )


@pytest.mark.parametrize("name", AGGREGATES)
def test_rewards_are_the_aggregate_of_the_server_step_scores(live: Live, name: str) -> None:
    func = StepRewardFunction(live.target, aggregate=name, soft_min_temperature=0.2)
    rewards = trl_call(func, PROBLEMS, COMPLETIONS, answer=["20"] * 3 + ["14"] * 3)
    with Client(live.target) as client:
        for problem, completion, reward in zip(PROBLEMS, COMPLETIONS, rewards, strict=True):
            steps = [s for s in completion.split("\n\n") if s]
            scores = client.score(problem, [steps]).candidates[0].step_scores
            assert reward == pytest.approx(aggregate(np.array(scores), [name], 0.2)[name], abs=1e-6)
    assert func.usage.calls == 2 and func.usage.candidates == 6  # one call per GRPO group
    assert func._scorer._searches == {}  # each call's searches were ended
    func.close()


def test_strings_and_conversations_get_the_same_rewards(live: Live) -> None:
    func = StepRewardFunction(live.target)  # min, the default
    plain = trl_call(func, PROBLEMS, COMPLETIONS)
    prompts = [[{"role": "system", "content": "Solve."}, {"role": "user", "content": p}] for p in PROBLEMS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    chat = trl_call(func, prompts, completions)
    assert chat == pytest.approx(plain, abs=1e-6)
    right, wrong_first, wrong_second = plain[:3]
    assert right > 0.9 and wrong_first < 0.1 and wrong_second < 0.1  # real rewards, far apart
    func.close()


def test_a_problem_column_and_another_separator(live: Live) -> None:
    # prompts carrying instructions the PRM was not trained on: the PRM reads the dataset's problem column
    prompts = [f"Solve step by step, one step a line: {p}" for p in PROBLEMS]
    by_column = StepRewardFunction(live.target, problem_key="problem", separator="\n")
    rewards = trl_call(by_column, prompts, [c.replace("\n\n", "\n") for c in COMPLETIONS], problem=PROBLEMS)
    reference = StepRewardFunction(live.target)
    assert rewards == pytest.approx(trl_call(reference, PROBLEMS, COMPLETIONS), abs=1e-6)
    with pytest.raises(KeyError, match="problem_key 'problem'"):
        trl_call(by_column, prompts, COMPLETIONS)
    by_column.close()
    reference.close()
