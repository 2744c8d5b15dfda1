"""`stepscore demo` end to end, and the default bundle behind `stepscore serve` without arguments."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from stepscore.runtime.client import Client
from tests.helpers.server import serve


def test_demo_runs_end_to_end() -> None:
    pytest.importorskip("torch", reason="the demo exports the model (export extra)")
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "demo", "--problems", "60"], capture_output=True, text=True, timeout=300
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for stage in ("[1/4] export", "[2/4] serve", "[3/4] search", "[4/4] stop", "server exited with code 0"):
        assert stage in out
    assert "<- the wrong step" in out
    prm = float(re.search(r"PRM, min step score\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    majority = float(re.search(r"majority vote\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert prm > majority
    # the wrong step is visibly low: every marked step scores below 0.5 in the printed chains
    marked = re.findall(r"^\s+([0-9.]+) [# ]+\S+\s+<- the wrong step$", out, flags=re.M)
    assert marked and all(float(s) < 0.5 for s in marked)


def test_serve_without_a_bundle_serves_the_default_model() -> None:
    from stepscore.runtime.default_model import default_bundle

    with serve(default_bundle()) as server:  # the same bundle `stepscore serve` picks with no argument
        with Client(server.target) as client:
            result = client.score("(2+3)*4", [["2+3=5", "5*4=20"], ["2+3=6", "6*4=24"]], aggregates=["min"])
    good, bad = (c.aggregates["min"] for c in result.candidates)
    assert good > 0.5 > bad
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepscore.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and "ready on" not in line:
            line = proc.stdout.readline()
        assert "ready on" in line
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
