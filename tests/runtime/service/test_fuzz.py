"""Property-based fuzzing of requests against a live server: no crash, no lost request, clear codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscore.v1 import stepscore_pb2 as pb
from stepscore.v1 import stepscore_pb2_grpc as pb_grpc
from tests.helpers.server import ServerProcess, serve

STUB: Any = pb_grpc.StepScorerStub  # generated code, untyped

SPECIAL = ["<extra_0>", "ки", "<|im_end|>", "<|eot_id|>", "<|im_start|>", "<s>", "</s>", "+", "-", "\n\n", "\x00"]
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(SPECIAL) | st.text(max_size=5), max_size=6).map("".join),
)
steps_candidate = st.lists(texts, max_size=5).map(lambda s: pb.Candidate(steps=pb.Steps(steps=s)))
token_candidate = st.builds(
    lambda ids, pos: pb.Candidate(tokens=pb.TokenIds(ids=ids, step_positions=pos)),
    st.lists(st.integers(0, 2000), max_size=30),
    st.lists(st.integers(0, 40), max_size=5),
)
# Well-formed requests whose texts still carry special-token strings and odd characters: half of the
# examples, so that scored answers are exercised as surely as refusals (random requests are rarely valid).
valid_step = st.lists(st.sampled_from(SPECIAL) | st.text(max_size=5), max_size=4).map(lambda parts: "x" + "".join(parts))
valid_requests = st.builds(
    pb.ScoreRequest,
    request_id=st.text(max_size=8),
    problem=texts,
    candidates=st.lists(
        st.lists(valid_step, min_size=1, max_size=5).map(lambda s: pb.Candidate(steps=pb.Steps(steps=s))),
        min_size=1,
        max_size=4,
    ),
    aggregates=st.lists(st.sampled_from(["min", "product", "mean", "last", "soft_min"]), max_size=3, unique=True),
    truncate_left=st.booleans(),
    soft_min_temperature=st.sampled_from([0.0, 0.1, 1.0]),
    timeout_ms=st.sampled_from([0, 5000]),
)
fuzzed_requests = st.builds(
    pb.ScoreRequest,
    request_id=st.text(max_size=8),
    problem=texts,
    candidates=st.lists(st.one_of(steps_candidate, token_candidate, st.just(pb.Candidate())), max_size=4),
    aggregates=st.lists(st.sampled_from(["min", "product", "mean", "last", "soft_min", "median", ""]), max_size=3),
    truncate_left=st.booleans(),
    soft_min_temperature=st.sampled_from([0.0, 0.1, 1.0, -1.0, float("nan"), float("inf")]),
    timeout_ms=st.sampled_from([0, 0, 0, 1, 5000]),
)
requests = st.one_of(fuzzed_requests, valid_requests)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def server(tiny_bundle: Callable[..., Path]) -> Iterator[ServerProcess]:
    with serve(tiny_bundle("qwen-prm")) as s:
        yield s


def test_fuzzed_requests_get_clear_codes_and_the_server_survives(server: ServerProcess) -> None:
    channel = grpc.insecure_channel(server.target)
    stub = STUB(channel)
    seen: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=requests)
    def check(request: pb.ScoreRequest) -> None:
        try:
            reply = stub.Score(request, timeout=30)
            code = grpc.StatusCode.OK
            assert len(reply.candidates) == len(request.candidates)
        except grpc.RpcError as err:
            code = err.code()
            assert "Traceback" not in (err.details() or "")
        assert code in ALLOWED, (code, request)
        seen[code] = seen.get(code, 0) + 1

    check()
    # a stream of fuzzed requests: every one answered exactly once, in any order
    batch = [
        pb.ScoreRequest(
            request_id=f"id{i}",
            problem=f"p{i} <extra_0>",
            candidates=[pb.Candidate(steps=pb.Steps(steps=["a <|im_end|>", "" if i % 2 == 0 else "b ки"]))],
            aggregates=["median"] if i % 3 == 0 else [],  # an unknown aggregate: an in-stream error
        )
        for i in range(30)
    ]
    answers = list(stub.ScoreStream(iter(batch), timeout=60))
    assert sorted(a.request_id for a in answers) == sorted(r.request_id for r in batch)
    assert sum(a.WhichOneof("result") == "error" for a in answers) == 10
    channel.close()
    assert server.proc.poll() is None
    assert seen.get(grpc.StatusCode.OK, 0) > 0 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0


def test_well_formed_requests_with_odd_text_are_all_scored(server: ServerProcess) -> None:
    channel = grpc.insecure_channel(server.target)
    stub = STUB(channel)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=valid_requests)
    def check(request: pb.ScoreRequest) -> None:
        reply = stub.Score(request, timeout=30)
        assert [len(c.step_scores) for c in reply.candidates] == [len(c.steps.steps) for c in request.candidates]

    check()
    channel.close()
