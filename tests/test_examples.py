"""Every script in examples/ runs against a live `stepscore serve` of the embedded default model (its target
given as the argument) and ends with a JSON summary line that shows the adapter worked."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepscore.runtime.default_model import default_bundle
from tests.helpers.server import ServerProcess, serve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with serve(default_bundle()) as s:
        yield s


def test_there_is_an_example_per_adapter() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"search_and_learn_beam", "openr_beam", "trl_grpo_reward"} <= names
    for path in EXAMPLES:  # each says the address it defaults to: where `stepscore serve` listens
        assert '"127.0.0.1:50051"' in path.read_text(), path.name


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(server: ServerProcess, path: Path) -> None:
    proc = subprocess.run([sys.executable, str(path), server.target], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    if "cached_share" in summary:  # the searches: the PRM found most right chains, re-sent steps came from the cache
        assert summary["right"] >= summary["problems"] - 1, proc.stdout
        assert summary["cached_share"] > 0.4, proc.stdout
    else:  # the GRPO reward: right completions far above wrong ones
        assert summary["mean_right"] > 0.8 and summary["mean_wrong"] < 0.2, proc.stdout
