"""A PRM reward function for TRL's `GRPOTrainer`, scored by a `stepscore serve`.

TRL calls every plain (non-model) reward function as (trl/trainer/grpo_trainer.py, `_calculate_rewards`)

    reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids_list, **reward_kwargs)

where `reward_kwargs` holds the dataset's other columns (one value per completion) and `trainer_state`,
`log_extra`, `log_metric` (and `environments`); it wants one float per completion (None: no reward). Prompts
and completions are strings, or, for a conversational dataset, lists of `{"role", "content"}` messages (a
completion: `[{"role": "assistant", "content": ...}]`; content may also be a list of `{"type": "text"}`
blocks). So the one-line change is `GRPOTrainer(..., reward_funcs=[StepRewardFunction("127.0.0.1:50051")])`.

Each completion is cut into steps (`separator`, "\\n\\n" by default), the server scores every step and returns
the aggregate asked for (`min`, `last`, `product`, `mean`, `soft_min`), the completion's reward. The problem
the PRM sees is the prompt (a conversational prompt: its last user message), or a dataset column named by
`problem_key` when the prompt carries instructions the PRM was not trained on. A GRPO group (the completions of
one prompt) goes in one call, so the server computes the problem's tokens once for the group; its search id
keeps a group on one replica of a several-replica target, and the search is ended after the call
(`end_searches`): the next step's completions are new, nothing of them is worth keeping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepscore.integrations.common import CHUNK, CONCURRENCY, DEFAULT_TARGET, STEP_SEPARATOR, Entry, Scorer, Usage, split_steps

AGGREGATES = ("min", "product", "mean", "last", "soft_min")  # the server's (stepscore.runtime.types.AGGREGATES)


def message_text(content: Any) -> str:
    """A message's text: its content string, or the text of its `{"type": "text", "text": ...}` blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, Mapping) and b.get("type", "text") == "text")
    return "" if content is None else str(content)


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The problem of a prompt: the string, or a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return message_text((users or list(prompt) or [{}])[-1].get("content"))


def completion_text(completion: str | Sequence[Mapping[str, Any]], separator: str = STEP_SEPARATOR) -> str:
    """The text of a completion: the string, or its assistant messages' contents (a turn ends a step)."""
    if isinstance(completion, str):
        return completion
    turns = [m for m in completion if m.get("role", "assistant") == "assistant"]
    return separator.join(message_text(m.get("content")) for m in turns)


class StepRewardFunction:
    """A TRL reward function: `(prompts, completions, **kwargs) -> list[float]`, one reward per completion,
    the `aggregate` of its step scores from the PRM served at `target`.

    `soft_min_temperature` is the `soft_min` aggregate's temperature; `search_prefix` starts every search id
    (None: calls carry none); `client_options` go to `stepscore.runtime.client.Client` (token, tls, timeout, ...).
    Picklable: the gRPC client is made at the first call of each copy."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        aggregate: str = "min",
        separator: str = STEP_SEPARATOR,
        problem_key: str | None = None,
        soft_min_temperature: float = 0.1,
        search_prefix: str | None = "trl-",
        end_searches: bool = True,
        concurrency: int = CONCURRENCY,
        chunk: int = CHUNK,
        **client_options: Any,
    ) -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")
        split_steps("", separator)  # an empty separator is refused here, not at the first call
        self.aggregate = aggregate
        self.separator = separator
        self.problem_key = problem_key
        self.soft_min_temperature = soft_min_temperature
        self.end_searches = end_searches
        self.__name__ = f"stepscore_{aggregate}"  # TRL logs each reward under its function's name
        self._scorer = Scorer(target, search_prefix=search_prefix, concurrency=concurrency, chunk=chunk, **client_options)

    def __call__(
        self,
        prompts: Sequence[str | Sequence[Mapping[str, Any]]],
        completions: Sequence[str | Sequence[Mapping[str, Any]]],
        **kwargs: Any,
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.problem_key is not None:
            if self.problem_key not in kwargs:
                raise KeyError(f"problem_key {self.problem_key!r} is not a column of the dataset: got {sorted(kwargs)}")
            problems = [str(p) for p in kwargs[self.problem_key]]
        else:
            problems = [prompt_text(p) for p in prompts]
        entries = [
            Entry(problem, [split_steps(completion_text(c, self.separator), self.separator)])
            for problem, c in zip(problems, completions, strict=True)
        ]
        scored = self._scorer.score(entries, aggregates=(self.aggregate,), soft_min_temperature=self.soft_min_temperature)
        if self.end_searches:
            self._scorer.end(dict.fromkeys(problems))
        return [float(per[0].aggregates[self.aggregate]) if per[0] else 0.0 for per in scored]

    @property
    def usage(self) -> Usage:
        return self._scorer.usage

    def close(self) -> None:
        self._scorer.close()


__all__ = ["AGGREGATES", "StepRewardFunction", "completion_text", "message_text", "prompt_text"]
