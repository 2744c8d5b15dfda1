"""Internal request and result types: what travels between the service, the engine and the scheduler.

Protobuf messages stop at the service layer; below it, everything speaks these frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

AGGREGATES = ("min", "product", "mean", "last", "soft_min")

IntArray = npt.NDArray[np.int32]


@dataclass(frozen=True)
class TokenIds:
    """A candidate the client formatted itself.

    `ids` is the complete model input (template, problem and steps, as the bundle's format describes);
    `step_positions[i]` is the index in `ids` where step i's score is read (its tag).
    """

    ids: Sequence[int]
    step_positions: Sequence[int]


Candidate = Sequence[str] | TokenIds


@dataclass(frozen=True)
class ScoreRequest:
    """One scoring call: a problem and candidate solutions, each a list of steps.

    `deadline` is an absolute `time.monotonic()` time; entries past it are dropped before compute.
    """

    problem: str
    candidates: Sequence[Candidate]
    aggregates: tuple[str, ...] = ()
    return_step_scores: bool = True
    truncate_left: bool = False
    soft_min_temperature: float = 0.1
    deadline: float | None = None
    request_id: str = ""
    # Steps every text candidate starts with (beam search: the kept beam; candidates are next steps).
    # The engine shares them whatever the shape of the request; this only saves sending them N times.
    prefix_steps: Sequence[str] = ()
    # The search this call belongs to: clients route by it (every call of one search reaches one replica,
    # see stepscore.runtime.client); a later prefix cache keys eviction on it. "": no search.
    search_id: str = ""

    def steps_of(self, candidate: Sequence[str]) -> list[str]:
        """A text candidate's whole chain: the prefix steps, then its own."""
        return [*self.prefix_steps, *candidate]


@dataclass(frozen=True)
class Formatted:
    """One candidate as the model sees it: token ids and the positions its step scores are read at."""

    ids: IntArray
    reads: IntArray
    num_truncated_steps: int = 0
    truncated_tokens: int = 0  # tokens cut from the left (truncate_left): positions shifted, not cacheable

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class CandidateScore:
    step_scores: list[float]
    aggregates: Mapping[str, float]
    num_tokens: int
    num_truncated_steps: int = 0
    cached_tokens: int = 0  # tokens whose K/V and scores came from the prefix cache (not computed again)


@dataclass(frozen=True)
class Timing:
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class ScoreResult:
    candidates: list[CandidateScore]
    timing: Timing = field(default_factory=Timing)
    request_id: str = ""
    replica: str = ""  # the replica that answered (its `stepscore-replica` metadata), filled in by the client
