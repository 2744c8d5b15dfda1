"""`stepscore score`: one output line per input line, bad lines reported with their number."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def test_score_jsonl(tiny_bundle: Callable[..., Path], tmp_path: Path) -> None:
    lines = [
        json.dumps({"problem": "2+2?", "candidates": [["2+2=4.", "So 4."], ["2+2=5."]], "aggregates": ["min", "last"]}),
        "not json",
        json.dumps({"problem": "x", "candidates": [["ok", ""]]}),
        json.dumps({"problem": "x", "candidates": [["fine"]]}),
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"problem": "\xff"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "score", str(tiny_bundle("trl")), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 5 and proc.returncode == 1
    first = out[0]["candidates"]
    assert len(first) == 2 and len(first[0]["step_scores"]) == 2 and len(first[1]["step_scores"]) == 1
    assert set(first[0]["aggregates"]) == {"min", "last"} and first[0]["num_tokens"] > 0
    assert out[1]["error"]["line"] == 2 and "not JSON" in out[1]["error"]["message"]
    assert out[2]["error"]["field"] == "candidates[0].steps[1]"
    assert "step_scores" in out[3]["candidates"][0]
    assert out[4]["error"]["line"] == 5 and "UTF-8" in out[4]["error"]["message"]
    assert "line 2:" in proc.stderr and "line 3:" in proc.stderr
