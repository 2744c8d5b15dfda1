"""The API from another language: a Node.js client (@grpc/grpc-js) against a live server."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.server import serve

NODE_DIR = Path(__file__).parent / "node"
ROOT = Path(__file__).resolve().parents[2]


def test_node_client_unary_stream_and_search(tiny_bundle: Callable[..., Path]) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("run `npm ci --prefix tests/protos/node` first (.ci/run does)")
    with serve(tiny_bundle("qwen-prm")) as server:
        proc = subprocess.run(
            ["node", str(NODE_DIR / "client.js"), server.target, str(ROOT / "protos")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    unary = lines[0]
    assert unary["rpc"] == "Score" and unary["request_id"] == "unary-1"
    assert [len(c["step_scores"]) for c in unary["candidates"]] == [2, 2]
    assert set(unary["candidates"][0]["aggregates"]) == {"min", "last"}
    stream = {line["request_id"]: line for line in lines[1:4]}
    assert set(stream) == {"s1", "s2", "s3"}
    assert len(stream["s2"]["candidates"]) == 1 and stream["s1"]["result"] == "response"
    assert stream["s3"]["result"] == "error" and stream["s3"]["error"]["code"] == 3  # INVALID_ARGUMENT
    assert stream["s3"]["error"]["field"] == "candidates[0]"
    # the search's next call: the first candidate's two steps came from the prefix cache, then EndSearch
    nxt, ended = lines[4], lines[5]
    assert nxt["request_id"] == "unary-2" and len(nxt["candidates"][0]["step_scores"]) == 3
    assert nxt["candidates"][0]["cached_tokens"] == unary["candidates"][0]["num_tokens"] > 0
    assert ended["rpc"] == "EndSearch" and ended["freed_bytes"] > 0
