"""The prefix cache through a live `stepscore serve`: cached_tokens, EndSearch, --cache-mb, its metrics and
its refusals."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.errors import InvalidRequest
from stepscore.runtime.client import AsyncClient, Client
from tests.helpers.server import serve

PROBLEM = "What is (2+3)*4?"
STEPS = ["2+3=5.", "5*4=20.", "The answer is 20."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("stepscore_prefix_cache"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_a_search_pays_only_for_new_steps_and_end_search_frees_it(tiny_bundle: Callable[..., Path]) -> None:
    port = _free_port()
    with serve(tiny_bundle("qwen-prm"), "--cache-mb", "16", "--metrics-port", str(port)) as s:
        client = Client(s.target)
        assert client.info()["prefix_cache_bytes"] == 16 << 20
        first = client.score(PROBLEM, [STEPS[:2]], search_id="search-1")
        second = client.score(PROBLEM, [STEPS], search_id="search-1")
        assert first.candidates[0].cached_tokens == 0
        assert second.candidates[0].cached_tokens == first.candidates[0].num_tokens
        again = client.score(PROBLEM, [STEPS])  # no search id: the cache answers anyone
        assert again.candidates[0].cached_tokens == again.candidates[0].num_tokens
        assert again.candidates[0].step_scores == second.candidates[0].step_scores

        m = _metrics(port)
        assert m['stepscore_prefix_cache_tokens_total{kind="hit"}'] == (
            second.candidates[0].cached_tokens + again.candidates[0].num_tokens
        )
        held = m["stepscore_prefix_cache_bytes"]
        assert held > 0 and m["stepscore_prefix_cache_entries"] == 3
        assert m["stepscore_prefix_cache_budget_bytes"] == 16 << 20

        # every entry was also used by the anonymous call: ending the search frees nothing it shares
        assert client.end_search("search-1") == 0
        third = client.score(PROBLEM, [[*STEPS, "Check: 20."]], search_id="search-2")
        assert third.candidates[0].cached_tokens == second.candidates[0].num_tokens

        async def end() -> int:
            async with AsyncClient(s.target) as ac:
                return await ac.end_search("search-2")

        assert asyncio.run(end()) > 0  # the new step only search-2 used
        assert client.end_search("search-2") == 0  # idempotent
        assert _metrics(port)["stepscore_prefix_cache_bytes"] == held
        with pytest.raises(InvalidRequest) as err:
            client.end_search("")
        assert err.value.field == "search_id"
        client.close()


def test_cache_mb_zero_turns_the_cache_off(tiny_bundle: Callable[..., Path]) -> None:
    with serve(tiny_bundle("qwen-prm"), env={"STEPSCORE_CACHE_MB": "0"}) as s:
        client = Client(s.target)
        assert client.info()["prefix_cache_bytes"] == 0
        client.score(PROBLEM, [STEPS[:2]], search_id="x")
        assert client.score(PROBLEM, [STEPS], search_id="x").candidates[0].cached_tokens == 0
        assert client.end_search("x") == 0
        client.close()


def test_a_negative_cache_size_refuses_to_start(tiny_bundle: Callable[..., Path]) -> None:
    cmd = [sys.executable, "-m", "stepscore.cli", "serve", str(tiny_bundle("qwen-prm")), "--cache-mb", "-5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cache" in proc.stderr, proc.stderr
