"""Every Python and Node.js example in README.md runs as written against a live `stepscore serve` of the
embedded default model (only the address is swapped for the test server's)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepscore.runtime.default_model import default_bundle
from tests.helpers.server import ServerProcess, serve

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / "tests" / "protos" / "node" / "node_modules"
ADDRESS = "127.0.0.1:50051"  # the address the examples are written for


def examples(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serve(default_bundle()) as s:
        yield s


def test_the_readme_has_examples_in_each_language() -> None:
    assert len(examples("python")) >= 1 and len(examples("js")) >= 1
    assert all(ADDRESS in code for code in examples("python") + examples("js"))


@pytest.mark.parametrize("index", range(len(examples("python"))))
def test_python_example_runs(server: ServerProcess, index: int) -> None:
    code = examples("python")[index].replace(ADDRESS, server.target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = ast.literal_eval(proc.stdout.strip())
    if isinstance(printed, dict):  # the search example: the second call reused all of the first call's tokens
        assert printed["cached"] == printed["first_call"] > 0 and printed["freed"] is True, printed
        return
    # the example prints each candidate's step scores: a right chain, one wrong from its first step, one wrong
    # at its second; the embedded model must tell them apart, step by step, by a wide margin
    right, wrong_first, wrong_second = printed
    assert min(right) > 0.9, right
    assert max(wrong_first) < 0.1, wrong_first
    assert wrong_second[0] > 0.9 and wrong_second[1] < 0.1, wrong_second


@pytest.mark.parametrize("index", range(len(examples("js"))))
def test_node_example_runs(server: ServerProcess, index: int) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        pytest.skip("run `npm ci --prefix tests/protos/node` first (.ci/setup does)")
    code = examples("js")[index].replace(ADDRESS, server.target)
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    proc = subprocess.run(["node", "-e", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    candidates = json.loads(proc.stdout)
    assert [len(c["step_scores"]) for c in candidates] == [2, 2]
    right, wrong = (c["aggregates"]["min"] for c in candidates)
    assert right > 0.9 and wrong < 0.1, candidates  # real scores, far apart: the example shows the model works
