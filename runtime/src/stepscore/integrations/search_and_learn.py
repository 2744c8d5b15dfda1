"""huggingface/search-and-learn's PRM, scored by a `stepscore serve`.

The contract is search-and-learn's `PRM` base class (src/sal/models/reward_models.py): constructed with the
search `Config` (plus keyword arguments), `score(questions, outputs)` takes one question per entry and that
entry's completions, each a text whose steps are separated by "\\n\\n", and returns per entry, per completion,
per step, a float. Its searches call it as

    scores = prm.score(prompts, completions)   # beam search: one entry per beam, [beam.current_text] each

so the one-line change is where the PRM is made: `prm = StepscorePRM(config, "127.0.0.1:50051")` in place of
`prm = load_prm(config)`. The model, its input format (system prompt, step tags) and its batching live in the
server (`stepscore export --preset math-shepherd-sal`, `rlhflow`, `qwen-prm`, ...): the adapter sends the
question and the steps.

Each question's completions go in one call whose search id is derived from the question, so the next
iteration of the same search finds its earlier steps in the server's prefix cache and pays only for the new
step; `end(questions)` frees a finished search's entries. `usage` counts the tokens scored and those the
cache served. search-and-learn is not imported: the config is only kept (as `search_config`), never read.
"""

from __future__ import annotations

from typing import Any

from stepscore.integrations.common import (
    CHUNK,
    CONCURRENCY,
    DEFAULT_TARGET,
    STEP_SEPARATOR,
    Entry,
    Scorer,
    SearchFacade,
    split_steps,
)


class StepscorePRM(SearchFacade):
    """A search-and-learn `PRM` whose `score` is a gRPC call per question to `target`.

    `search_prefix` starts every search id (a run that must not share cache entries with, or end the searches
    of, another run over the same questions gives its own); `separator` cuts completions into steps (see
    `stepscore.integrations.common.split_steps` for a trailing separator and empty steps). `client_options`
    go to `stepscore.runtime.client.Client` (token, tls, root_ca, timeout, retry, ...)."""

    def __init__(
        self,
        search_config: Any = None,
        target: str = DEFAULT_TARGET,
        *,
        search_prefix: str = "sal-",
        separator: str = STEP_SEPARATOR,
        concurrency: int = CONCURRENCY,
        chunk: int = CHUNK,
        **client_options: Any,
    ) -> None:
        split_steps("", separator)  # an empty separator is refused here, not at the first call
        self.search_config = search_config
        self.separator = separator
        # the base class's attributes: the model and its tokenizer live in the server
        self.model: Any = None
        self.tokenizer: Any = None
        self._scorer = Scorer(target, search_prefix=search_prefix, concurrency=concurrency, chunk=chunk, **client_options)

    def score(self, questions: list[str], outputs: list[list[str]]) -> list[list[list[float]]]:
        """Per question, per completion, the score of each of its steps (one list per "\\n\\n"-separated step)."""
        if len(questions) != len(outputs):
            raise ValueError(f"{len(questions)} questions but {len(outputs)} lists of outputs")
        entries = [Entry(q, [split_steps(o, self.separator) for o in outs]) for q, outs in zip(questions, outputs, strict=True)]
        return [[list(c.step_scores) if c else [] for c in per] for per in self._scorer.score(entries)]


__all__ = ["StepscorePRM"]
