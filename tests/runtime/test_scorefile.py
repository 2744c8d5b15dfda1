"""`stepscore score`: one output line per input line, bad lines reported with their number and column, blank
lines skipped, a closed stdout ended quietly: all through the real command."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.errors import Unavailable
from stepscore.runtime.scorefile import OutputClosed, score_lines
from stepscore.runtime.types import ScoreRequest, ScoreResult


def _score(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "score", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin.decode() if stdin is not None else None,
    )


def test_score_jsonl(tiny_bundle: Callable[..., Path], tmp_path: Path) -> None:
    lines = [
        json.dumps({"problem": "2+2?", "candidates": [["2+2=4.", "So 4."], ["2+2=5."]], "aggregates": ["min", "last"]}),
        "not json",
        json.dumps({"problem": "x", "candidates": [["ok", ""]]}),  # an empty step is scored, as the references do
        json.dumps({"problem": "x", "candidates": [["fine"]]}),
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"problem": "\xff"}\n')
    proc = _score(str(tiny_bundle("trl")), str(src))
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 5 and proc.returncode == 1
    first = out[0]["candidates"]
    assert len(first) == 2 and len(first[0]["step_scores"]) == 2 and len(first[1]["step_scores"]) == 1
    assert set(first[0]["aggregates"]) == {"min", "last"} and first[0]["num_tokens"] > 0
    assert out[1]["error"]["line"] == 2 and "not JSON" in out[1]["error"]["message"]
    assert len(out[2]["candidates"][0]["step_scores"]) == 2
    assert "step_scores" in out[3]["candidates"][0]
    assert out[4]["error"]["line"] == 5 and "UTF-8" in out[4]["error"]["message"]
    assert "line 2:" in proc.stderr and "line 5:" in proc.stderr


def test_a_file_of_growing_chains_reuses_earlier_lines(tiny_bundle: Callable[..., Path], tmp_path: Path) -> None:
    """A JSONL of chains as a search writes them (each line the previous chain plus a step), scored one line at a
    time: every line after the first finds the previous chain in the prefix cache; with --cache-mb 0 none does."""
    steps = ["2+2=4.", "4*3=12.", "12-2=10.", "So 10."]
    src = tmp_path / "chains.jsonl"
    src.write_text("".join(json.dumps({"problem": "2+2, *3, -2?", "candidates": [steps[:k]]}) + "\n" for k in range(1, 5)))
    on = [
        json.loads(line)["candidates"][0]
        for line in _score(str(tiny_bundle("trl")), str(src), "--concurrency", "1").stdout.splitlines()
    ]
    off = _score(str(tiny_bundle("trl")), str(src), "--concurrency", "1", "--cache-mb", "0").stdout.splitlines()
    assert "cached_tokens" not in on[0]
    assert [c["cached_tokens"] for c in on[1:]] == [c["num_tokens"] for c in on[:-1]]
    assert all("cached_tokens" not in json.loads(line)["candidates"][0] for line in off)
    for a, b in zip(on, (json.loads(line)["candidates"][0] for line in off), strict=True):
        assert max(abs(x - y) for x, y in zip(a["step_scores"], b["step_scores"], strict=True)) <= 1e-5


def test_unknown_keys_blank_lines_and_columns(tmp_path: Path) -> None:
    good = {"problem": "(2+3)*4", "candidates": [["2+3=5", "5*4=20"]]}
    broken = '{"problem": "(2+3)*4", "candidates": [["2+3=5"]] x}'
    token_typo = {"problem": "p", "candidates": [{"ids": [1, 2], "step_position": [1]}]}
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        (
            json.dumps({**good, "candidate": [["2+3=5"]]})
            + "\n\n"
            + json.dumps(good)
            + "\n   \n"
            + broken
            + "\n"
            + json.dumps(token_typo)
            + "\n"
        ).encode()
        + b'{"problem": "caf\xc3\xa9 \xff"}\n\n\n'
    )
    proc = _score(str(src))  # no bundle: the embedded model
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 5, proc.stdout  # one per non-blank line: the three blank ones are skipped, not errors
    assert proc.returncode == 1

    typo = out[0]["error"]
    assert (typo["line"], typo["field"]) == (1, "candidate") and "unknown key 'candidate'" in typo["message"]
    assert out[1]["candidates"][0]["step_scores"][1] > 0.9  # line 3: a real line scores
    syntax = out[2]["error"]
    assert syntax["line"] == 5 and broken[syntax["column"] - 1] == "x"  # the column points at the culprit
    assert out[3]["error"]["field"] == "candidates[0].step_position"
    utf8 = out[4]["error"]
    raw = b'{"problem": "caf\xc3\xa9 \xff"}'
    assert utf8["line"] == 7 and raw[utf8["column"] - 1] == 0xFF  # a byte column: the line is not text there
    assert proc.stderr.splitlines()[0].startswith("line 1: candidate: unknown key 'candidate'")


def test_usage_names_one_bundle_and_one_file() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "score", "--help"], capture_output=True, text=True, timeout=60
    )
    usage = " ".join(proc.stdout.split("\n\n")[0].split())
    assert usage.endswith("[BUNDLE] IN.jsonl"), usage
    assert "[[BUNDLE]" not in proc.stdout


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    line = json.dumps({"problem": "(2+3)*4", "candidates": [["2+3=5", "5*4=20"]] * 4})
    # far more output than a pipe holds: the command is still writing when its reader goes away
    src.write_text((line + "\n") * 4000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepscore.cli", "score", str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert json.loads(first)["candidates"]
    assert code == 0 and err == "", err


class _ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError


class _FailingEngine:
    """Scores nothing: every line fails, as it does once the engine has begun shutting down. The first line
    fails last, once `hold` lines have started, so that the lines after it finish first and the producer runs
    ahead of the writer: with a window of c lines, the (c + 2)th is started while the window is full."""

    def __init__(self, hold: int) -> None:
        self.started = 0
        self.hold = hold
        self.others_ran = asyncio.Event()

    async def score(self, request: ScoreRequest) -> ScoreResult:
        self.started += 1
        if self.started >= self.hold:
            self.others_ran.set()
        if request.problem == "first":
            await self.others_ran.wait()
        raise Unavailable("the engine is shutting down")


@pytest.mark.parametrize("concurrency", [1, 2, 3, 8])
def test_no_line_is_left_unretrieved_when_the_reader_goes_away(concurrency: int) -> None:
    # The CI failure this pins: when the reader left, lines already failed in the window were cancelled (a no-op
    # on a finished task) and one the producer had started but not yet queued was forgotten; neither outcome
    # was retrieved, so asyncio logged "Task exception was never retrieved" on stderr, which `| head` users see.
    unretrieved: list[str] = []
    first, line = (json.dumps({"problem": p, "candidates": [["s"]]}).encode() + b"\n" for p in ("first", "later"))

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx["message"]))
        # with one line at a time nothing runs ahead: the first line is released at once
        engine = _FailingEngine(hold=concurrency + 2 if concurrency > 1 else 1)
        with pytest.raises(OutputClosed):
            await score_lines(engine, io.BytesIO(first + line * 50), _ClosedPipe(), concurrency)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:  # every task created so far run to its end; `wait` retrieves no outcome
            await asyncio.wait(others)
        gc.collect()  # a task whose failure nobody retrieved reports it when collected

    asyncio.run(main())
    assert unretrieved == []
