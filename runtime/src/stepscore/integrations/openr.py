"""OpenR's reward-model calling function, scored by a `stepscore serve`.

The contract is OpenR's `RewardModelCallingFunction` (reason/inference/rm_call.py): constructed with a config
that has `step_tag` and `format_str`, called as `rm_call(question_answer_pairs, lm_step_tag)` with one
`(question, answer)` pair (-> that answer's step rewards) or a list of them (-> one list per pair). The answer's
steps are separated by the LM's step tag; like `replace_step_tag` there, each piece is stripped and empty ones
are dropped, so an answer of k actions gets k rewards (its tree search checks exactly that, and reads the last;
an answer with no step gets [], which it scores 0). Its searches call it as

    rm_call_fn = functools.partial(rm_call, lm_step_tag=lm_call.lm_step_tag)   # reason/evaluation/methods.py

so the one-line change is where `rm_call` is made (reason/evaluation/evaluate.py):
`rm_call = StepscoreRewardModelCaller(rm_config, "127.0.0.1:50051")` in place of `RMRemoteCaller(rm_config)`.
The PRM's own step tag and input format (`step_tag`, `format_str`) are the bundle's business on the server
(`stepscore export --preset math-shepherd`, `qwen-prm`, ...): the config is kept, not read.

Pairs about one question go in one call whose search id is derived from the question: the children of a tree
node share their parent's steps, which the server's prefix cache computed when it scored the parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast, overload

from stepscore.integrations.common import CHUNK, CONCURRENCY, DEFAULT_TARGET, Entry, Scorer, SearchFacade


def answer_steps(answer: str, lm_step_tag: str) -> list[str]:
    """OpenR's steps of an answer: cut at `lm_step_tag`, each piece stripped, empty pieces dropped (as
    `RewardModelCallingFunction.replace_step_tag` does before it puts the PRM's tag after each step)."""
    if not lm_step_tag:
        raise ValueError("lm_step_tag must not be empty")
    return [s for s in (piece.strip() for piece in answer.split(lm_step_tag)) if s]


class StepscoreRewardModelCaller(SearchFacade):
    """An OpenR `RewardModelCallingFunction` whose call is a gRPC call per question to `target`.

    `search_prefix` starts every search id; `client_options` go to `stepscore.runtime.client.Client`."""

    def __init__(
        self,
        config: Any = None,
        target: str = DEFAULT_TARGET,
        *,
        search_prefix: str = "openr-",
        concurrency: int = CONCURRENCY,
        chunk: int = CHUNK,
        **client_options: Any,
    ) -> None:
        self.config = config
        # the base class's attributes (the PRM's own tag and prompt format: applied by the server's bundle)
        self.step_tag: str | None = getattr(config, "step_tag", None)
        self.format_str: str | None = getattr(config, "format_str", None)
        self._scorer = Scorer(target, search_prefix=search_prefix, concurrency=concurrency, chunk=chunk, **client_options)

    # the list form first: `functools.partial(rm_call, lm_step_tag=...)`, how OpenR's searches bind it and call
    # it with lists, takes the first overload's type
    @overload
    def __call__(self, question_answer_pairs: Sequence[tuple[str, str]], lm_step_tag: str) -> list[list[float]]: ...

    @overload
    def __call__(self, question_answer_pairs: tuple[str, str], lm_step_tag: str) -> list[float]: ...

    def __call__(
        self, question_answer_pairs: tuple[str, str] | Sequence[tuple[str, str]], lm_step_tag: str
    ) -> list[float] | list[list[float]]:
        """One pair -> its step rewards; a list of pairs -> one list of step rewards per pair, in order."""
        single = isinstance(question_answer_pairs[0], str)
        if single:
            pairs = [cast("tuple[str, str]", question_answer_pairs)]
        else:
            pairs = list(cast("Sequence[tuple[str, str]]", question_answer_pairs))
        entries = [Entry(question, [answer_steps(answer, lm_step_tag)]) for question, answer in pairs]
        rewards = [list(per[0].step_scores) if per[0] else [] for per in self._scorer.score(entries)]
        return rewards[0] if single else rewards


__all__ = ["StepscoreRewardModelCaller", "answer_steps"]
