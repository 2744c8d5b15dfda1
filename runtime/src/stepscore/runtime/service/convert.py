"""Protobuf <-> runtime types, for the server and the Python client alike.

Field-level validation of the wire format happens here (what protobuf cannot express); the engine
validates the rest. Errors name the field as a path: "candidates[2].steps[0]".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from stepscore.errors import InvalidRequest
from stepscore.runtime.types import CandidateScore, ScoreRequest, ScoreResult, Timing, TokenIds
from stepscore.v1 import stepscore_pb2 as pb

# Metadata keys of the scale-out contract (docs: README "Scale out", deploy/README.md).
REPLICA_HEADER = "stepscore-replica"  # response initial metadata: the replica that answered
SEARCH_ID_HEADER = "x-stepscore-search-id"  # request header: what ring_hash, nginx and Envoy hash on


def candidate_views(msg: Any) -> list[Sequence[str] | TokenIds]:
    """The candidates of a ScoreRequest message as the runtime sees them, without copying their contents:
    enough for the size limits (stepscore.runtime.limits) to be checked before anything is converted."""
    out: list[Sequence[str] | TokenIds] = []
    for i, cand in enumerate(msg.candidates):
        kind = cand.WhichOneof("kind")
        if kind == "steps":
            out.append(cand.steps.steps)
        elif kind == "tokens":
            out.append(TokenIds(cand.tokens.ids, cand.tokens.step_positions))
        else:
            raise InvalidRequest(f"candidates[{i}]", "set either steps or tokens")
    return out


def request_from_proto(msg: Any, grpc_deadline: float | None = None) -> ScoreRequest:
    """`grpc_deadline` is an absolute time.monotonic() deadline (from the call), if any."""
    candidates: list[list[str] | TokenIds] = []
    for i, cand in enumerate(msg.candidates):
        kind = cand.WhichOneof("kind")
        if kind == "steps":
            candidates.append(list(cand.steps.steps))
        elif kind == "tokens":
            candidates.append(TokenIds(list(cand.tokens.ids), list(cand.tokens.step_positions)))
        else:
            raise InvalidRequest(f"candidates[{i}]", "set either steps or tokens")
    deadline = grpc_deadline
    if msg.timeout_ms:
        own = time.monotonic() + msg.timeout_ms / 1000.0
        deadline = own if deadline is None else min(deadline, own)
    return ScoreRequest(
        problem=msg.problem,
        candidates=candidates,
        aggregates=tuple(msg.aggregates),
        return_step_scores=msg.return_step_scores if msg.HasField("return_step_scores") else True,
        truncate_left=msg.truncate_left,
        soft_min_temperature=msg.soft_min_temperature or 0.1,
        deadline=deadline,
        request_id=msg.request_id,
        prefix_steps=tuple(msg.prefix_steps),
        search_id=msg.search_id,
    )


def request_to_proto(request: ScoreRequest) -> Any:
    msg = pb.ScoreRequest(
        request_id=request.request_id,
        problem=request.problem,
        aggregates=list(request.aggregates),
        return_step_scores=request.return_step_scores,
        truncate_left=request.truncate_left,
        soft_min_temperature=request.soft_min_temperature,
        prefix_steps=list(request.prefix_steps),
        search_id=request.search_id,
    )
    for cand in request.candidates:
        if isinstance(cand, TokenIds):
            msg.candidates.add(tokens=pb.TokenIds(ids=list(cand.ids), step_positions=list(cand.step_positions)))
        else:
            msg.candidates.add(steps=pb.Steps(steps=list(cand)))
    if request.deadline is not None:
        msg.timeout_ms = max(1, int((request.deadline - time.monotonic()) * 1000))
    return msg


def result_to_proto(result: ScoreResult) -> Any:
    msg = pb.ScoreResponse(
        request_id=result.request_id,
        timing=pb.Timing(
            queue_ms=result.timing.queue_ms,
            tokenize_ms=result.timing.tokenize_ms,
            compute_ms=result.timing.compute_ms,
            total_ms=result.timing.total_ms,
        ),
    )
    for cand in result.candidates:
        msg.candidates.add(
            step_scores=cand.step_scores,
            aggregates=dict(cand.aggregates),
            num_tokens=cand.num_tokens,
            num_truncated_steps=cand.num_truncated_steps,
            cached_tokens=cand.cached_tokens,
        )
    return msg


def result_from_proto(msg: Any, replica: str = "") -> ScoreResult:
    t = msg.timing
    return ScoreResult(
        candidates=[
            CandidateScore(
                step_scores=list(c.step_scores),
                aggregates=dict(c.aggregates),
                num_tokens=c.num_tokens,
                num_truncated_steps=c.num_truncated_steps,
                cached_tokens=c.cached_tokens,
            )
            for c in msg.candidates
        ],
        timing=Timing(queue_ms=t.queue_ms, tokenize_ms=t.tokenize_ms, compute_ms=t.compute_ms, total_ms=t.total_ms),
        request_id=msg.request_id,
        replica=replica,
    )
