"""Scale out on loopback: three `stepscore serve` replicas of the embedded model behind the client's own
ring_hash balancing (stepscore.runtime.client). Every call of one search reaches one replica; searches spread
over all three; a replica killed with SIGKILL mid-run costs retries, not errors, and moves only its searches."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import grpc
import pytest

from stepscore.errors import InvalidRequest
from stepscore.runtime.client import SEARCH_ID_HEADER, AsyncClient, Client, names_several
from stepscore.runtime.default_model import default_bundle
from stepscore.runtime.types import ScoreRequest, ScoreResult
from stepscore.v1 import stepscore_pb2 as pb
from stepscore.v1 import stepscore_pb2_grpc as pb_grpc
from tests.helpers.server import ServerProcess, serve

SEARCHES = 30  # enough that three replicas all get some: P(one gets none) = 3 * (2/3)**30, about 2e-5
CALLS = 4  # per search


def _problem(k: int) -> str:
    return f"What is {k} + {k + 1}?"


def _steps(k: int, call: int) -> list[list[str]]:
    return [[f"{k} + {k + 1} = {2 * k + 1}.", f"Check {call}: the answer is {2 * k + 1}."]]


# a call that keeps a replica busy for a while (about a second on two loaded cores): distinct chains
HEAVY = [
    [f"{k % 47}+{k % 7}={k % 47 + k % 7}", f"{k % 47 + k % 7}-{k % 5}={k % 47 + k % 7 - k % 5} ({k})"] for k in range(3000)
]


# the heavy call is over the default candidate limit (1024): the replicas that take it allow it
HEAVY_LIMIT = ("--max-candidates", str(len(HEAVY)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _queued_tokens(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("stepscore_queued_tokens "))


def _start(stack: ExitStack, names: list[str]) -> list[ServerProcess]:
    return [stack.enter_context(serve(default_bundle(), "--replica-id", name)) for name in names]


def _target(servers: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(s.target for s in servers)


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProcess]]:
    with ExitStack() as stack:
        yield _start(stack, ["r0", "r1", "r2"])


def test_one_server_names_itself_in_metadata_and_info() -> None:
    with serve(default_bundle()) as s, Client(s.target) as client:
        assert not names_several(s.target)
        assert client.score(_problem(1), _steps(1, 0)).replica == s.target  # default: host:port
        assert client.info()["replica_id"] == s.target
        # any gRPC client sees it in the initial metadata, errors included
        channel = grpc.insecure_channel(s.target)
        stub_cls: Any = pb_grpc.StepScorerStub  # generated code, untyped
        stub = stub_cls(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score.with_call(pb.ScoreRequest(problem="p"))  # no candidates: INVALID_ARGUMENT
        # an error's in the trailers (Trailers-Only, so that a client's retry policy may still retry it)
        assert ("stepscore-replica", s.target) in tuple(err.value.trailing_metadata())
        assert not err.value.initial_metadata()
        channel.close()

        async def stream() -> list[str]:
            async with AsyncClient(s.target) as aclient:
                requests = [ScoreRequest(_problem(k), _steps(k, 0), request_id=f"q{k}") for k in range(3)]
                return [item.result.replica async for item in aclient.score_stream(requests) if item.result]

        assert asyncio.run(stream()) == [s.target] * 3


def test_bad_replica_id_refuses_to_start() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "serve", "--replica-id", "caf\u00e9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "printable ASCII" in proc.stderr, proc.stderr


def test_default_replica_id() -> None:
    from stepscore.runtime.service.config import default_replica_id

    assert default_replica_id("127.0.0.1", 5001) == "127.0.0.1:5001"
    assert default_replica_id("0.0.0.0", 5001) == f"{socket.gethostname()}:5001"  # not the same for every replica


def test_service_config_variants() -> None:
    from stepscore.runtime.client import service_config

    full = json.loads(service_config())
    assert full["loadBalancingConfig"] == [{"ring_hash_experimental": {"requestHashHeader": SEARCH_ID_HEADER}}]
    assert full["healthCheckConfig"] == {"serviceName": ""}
    assert full["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "methodConfig" not in json.loads(service_config(retry=False))  # still balanced, no retries
    assert set(json.loads(service_config(several=False))) == {"methodConfig"}  # one address behind a proxy
    spread = json.loads(service_config(balancing="round_robin"))
    assert spread["loadBalancingConfig"] == [{"round_robin": {}}] and spread["healthCheckConfig"] == {"serviceName": ""}
    with pytest.raises(ValueError, match="balancing must be one of ring_hash, round_robin"):
        service_config(balancing="random")
    from stepscore.runtime.client import Client

    with pytest.raises(ValueError, match="balancing must be one of"):  # at construction, not at the first call
        Client("127.0.0.1:1", balancing="least_request")


def test_target_forms() -> None:
    assert names_several("ipv4:127.0.0.1:5001,127.0.0.1:5002") and names_several("dns:///stepscore-headless:50051")
    assert not names_several("127.0.0.1:5001") and not names_several("ipv4:127.0.0.1:5001")


def test_every_call_of_a_search_lands_on_one_replica_and_searches_spread(replicas: list[ServerProcess]) -> None:
    seen: dict[str, set[str]] = defaultdict(set)
    with Client(_target(replicas)) as client:
        for call in range(CALLS):
            for k in range(SEARCHES):
                result = client.score(_problem(k), _steps(k, call), search_id=f"search-{k}")
                seen[f"search-{k}"].add(result.replica)
        assert all(len(where) == 1 for where in seen.values()), seen
        assert set().union(*seen.values()) == {"r0", "r1", "r2"}
        # calls without a search id carry no header: ring_hash picks a random replica for each
        spread = {client.score(_problem(0), _steps(0, 0)).replica for _ in range(SEARCHES)}
        assert len(spread) > 1

    async def streams() -> dict[str, set[str]]:
        # the asyncio client: unary calls and a stream of one search reach the replica the sync client found
        out: dict[str, set[str]] = defaultdict(set)
        async with AsyncClient(_target(replicas)) as aclient:
            for k in range(6):
                sid = f"search-{k}"
                out[sid].add((await aclient.score(_problem(k), _steps(k, 9), search_id=sid)).replica)
                requests = [ScoreRequest(_problem(k), _steps(k, c), request_id=f"c{c}") for c in range(3)]
                async for item in aclient.score_stream(requests, search_id=sid):
                    assert item.result is not None
                    out[sid].add(item.result.replica)
        return out

    for sid, where in asyncio.run(streams()).items():
        assert where == seen[sid], sid


def test_refusals_still_name_the_field_through_the_balancer(replicas: list[ServerProcess]) -> None:
    with Client(_target(replicas)) as client, pytest.raises(InvalidRequest) as err:
        client.score(_problem(0), [], search_id="search-0")
    assert err.value.field == "candidates"


def test_search_id_travels_in_the_request_and_the_header() -> None:
    from stepscore.runtime.service.convert import request_from_proto, request_to_proto

    msg = request_to_proto(ScoreRequest("p", [["a"]], search_id="s-1"))
    assert msg.search_id == "s-1" and request_from_proto(msg).search_id == "s-1"
    assert SEARCH_ID_HEADER == "x-stepscore-search-id"


def test_a_replica_killed_mid_run_loses_no_call_and_moves_only_its_searches() -> None:
    with ExitStack() as stack:
        ports = [_free_port() for _ in range(3)]
        servers = [
            stack.enter_context(serve(default_bundle(), "--replica-id", f"r{i}", "--metrics-port", str(ports[i]), *HEAVY_LIMIT))
            for i in range(3)
        ]
        by_name = {f"r{i}": (s, ports[i]) for i, s in enumerate(servers)}
        with Client(servers[0].target) as direct:  # the reference scores: one replica, no balancing
            expected = {(k, c): direct.score(_problem(k), _steps(k, c)) for k in range(SEARCHES) for c in range(CALLS)}
        with Client(_target(servers), timeout=30) as client:
            home = {k: client.score(_problem(k), _steps(k, 0), search_id=f"search-{k}").replica for k in range(SEARCHES)}
            victim = home[0]
            done = 0
            halfway = threading.Event()
            lock = threading.Lock()
            after: dict[int, list[str]] = defaultdict(list)

            def search(k: int) -> list[tuple[int, ScoreResult]]:
                nonlocal done
                out = []
                for c in range(CALLS):
                    if c == CALLS // 2:
                        killed.wait(timeout=300)  # every search makes half its calls before the kill, half after
                    result = client.score(_problem(k), _steps(k, c), search_id=f"search-{k}")
                    out.append((c, result))
                    with lock:
                        done += 1
                        if done == SEARCHES * CALLS // 2:
                            halfway.set()
                return out

            killed = threading.Event()
            with ThreadPoolExecutor(SEARCHES + 2) as pool:
                futures = {k: pool.submit(search, k) for k in range(SEARCHES)}
                halfway.wait(timeout=120)
                # one call certainly in flight on the victim when it dies: a heavy one of search 0 (whose home it
                # is), killed once the victim's queue holds it; only a retry elsewhere can answer it
                heavy = pool.submit(client.score, _problem(0), HEAVY, search_id="search-0")
                victim_server, victim_metrics = by_name[victim]
                # the heavy call alone queues more tokens than all the small calls together (about 30 each)
                while _queued_tokens(victim_metrics) < 10_000 and not heavy.done():
                    threading.Event().wait(0.005)  # polling the victim's own gauge, not a guess at timing
                assert not heavy.done(), "the heavy call finished before the kill: make it heavier"
                victim_server.stop(signal.SIGKILL)  # mid-run: the heavy call in flight, half of every search to come
                killed_at = done
                killed.set()
                moved_heavy = heavy.result()
                assert len(moved_heavy.candidates) == len(HEAVY) and moved_heavy.replica != victim
                for k, future in futures.items():
                    for c, result in future.result():  # raises if any call failed
                        got = [s.step_scores for s in result.candidates]
                        want = [s.step_scores for s in expected[(k, c)].candidates]
                        assert got == [pytest.approx(w, abs=1e-5) for w in want], (k, c)
                        after[k].append(result.replica)
            assert 0 < killed_at < SEARCHES * CALLS
            # after the kill, the victim's searches are answered elsewhere; nobody else's searches move
            moved = {k for k in range(SEARCHES) if home[k] == victim}
            for k in range(SEARCHES):
                if k in moved:
                    assert client.score(_problem(k), _steps(k, 0), search_id=f"search-{k}").replica != victim
                    later = {client.score(_problem(k), _steps(k, 1), search_id=f"search-{k}").replica for _ in range(3)}
                    assert len(later) == 1 and victim not in later, (k, later)
                else:
                    assert set(after[k]) == {home[k]}, (k, home[k], after[k])
            assert moved and len(moved) < SEARCHES


def test_replica_flag_comes_from_the_environment() -> None:
    with serve(default_bundle(), env={"STEPSCORE_REPLICA_ID": "from-env"}) as s, Client(s.target) as client:
        assert client.info()["replica_id"] == "from-env"


def test_a_draining_replica_leaves_the_ring_while_it_finishes_its_calls() -> None:
    with ExitStack() as stack:
        ports = [_free_port() for _ in range(3)]
        servers = [
            stack.enter_context(serve(default_bundle(), "--replica-id", f"r{i}", "--metrics-port", str(ports[i]), *HEAVY_LIMIT))
            for i in range(3)
        ]
        with Client(_target(servers), timeout=60) as client, ThreadPoolExecutor(1) as pool:
            home = {k: client.score(_problem(k), _steps(k, 0), search_id=f"search-{k}").replica for k in range(SEARCHES)}
            victim = home[0]
            index = int(victim[1:])
            heavy = pool.submit(client.score, _problem(0), HEAVY, search_id="search-0")
            while _queued_tokens(ports[index]) < 10_000 and not heavy.done():
                threading.Event().wait(0.005)
            servers[index].proc.send_signal(signal.SIGTERM)  # drain: NOT_SERVING, refuse new calls, finish this one
            # while the heavy call still runs there, the victim's searches are already answered elsewhere (the
            # client watches health); without that, the retries would hash back to the draining replica
            moved = {k: client.score(_problem(k), _steps(k, 1), search_id=f"search-{k}").replica for k in home}
            assert not heavy.done(), "the drain ended before the calls: make the heavy call heavier"
            assert all(moved[k] != victim for k in home if home[k] == victim), moved
            assert all(moved[k] == home[k] for k in home if home[k] != victim), (home, moved)
            assert heavy.result().replica == victim  # the drain let it finish
            assert servers[index].proc.wait(timeout=60) == 0  # the drain ended by itself, exit 0
