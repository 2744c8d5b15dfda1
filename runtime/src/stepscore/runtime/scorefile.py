"""`stepscore score [BUNDLE] IN.jsonl`: score a JSON-lines file, one result line per input line, in order."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import IO, Any

from stepscore.errors import ConfigError, InvalidRequest, StepscoreError
from stepscore.runtime.flags import add_bundle_arg, add_engine_args, add_flag, bundle_path, engine_config, engine_devices
from stepscore.runtime.types import ScoreRequest, ScoreResult, TokenIds

# the keys an input line may have; any other is a mistake (a typo such as "candidate" would otherwise score
# nothing, silently)
LINE_KEYS = (
    "problem",
    "candidates",
    "prefix_steps",
    "aggregates",
    "truncate_left",
    "return_step_scores",
    "soft_min_temperature",
)
TOKEN_CANDIDATE_KEYS = ("ids", "step_positions")

# --- score ---------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "score",
        help="score a JSON-lines file; one JSON line per input line on stdout",
        description='Input lines: {"problem": str, "candidates": [[step, ...], ...], "aggregates": ["min", ...]} '
        '("prefix_steps", "aggregates", "truncate_left", "return_step_scores" and "soft_min_temperature" optional; '
        "any other key is an error for that line). Output: one line per input line, blank lines skipped: "
        '{"candidates": [{"step_scores": [...], "aggregates": {...}, "num_tokens": int}, ...]}, or {"error": {...}} '
        "for a bad line (also reported on stderr with its line number); the other lines are still scored. Exit "
        "code 0 when every line was scored, 1 when some were not.",
    )
    add_bundle_arg(p)
    p.add_argument("input", metavar="IN.jsonl", help="the input file ('-' for stdin)")
    add_flag(p, "--concurrency", 256, int, "lines in flight at once", scope="score")
    add_flag(p, "--log-level", "warning", str, "logging level", choices=("debug", "info", "warning", "error"))
    add_engine_args(p)
    p.set_defaults(run=run_score)


def _check_keys(obj: dict[str, Any], known: tuple[str, ...], what: str, where: str = "") -> None:
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise InvalidRequest(f"{where}{unknown[0]}", f"unknown key {unknown[0]!r}; {what} takes {', '.join(known)}")


def _flag(obj: dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(key, "must be true or false")
    return value


def parse_line(obj: Any) -> ScoreRequest:
    """A JSON object from an input line -> ScoreRequest (InvalidRequest names the field)."""
    if not isinstance(obj, dict):
        raise InvalidRequest("line", "must be a JSON object")
    _check_keys(obj, LINE_KEYS, "a line")
    problem = obj.get("problem", "")
    candidates_raw = obj.get("candidates")
    if not isinstance(candidates_raw, list):
        raise InvalidRequest("candidates", "must be a list of candidates (each a list of step strings)")
    candidates: list[list[str] | TokenIds] = []
    for i, cand in enumerate(candidates_raw):
        if isinstance(cand, dict):
            _check_keys(cand, TOKEN_CANDIDATE_KEYS, "a token candidate", f"candidates[{i}].")
            if not isinstance(cand.get("ids"), list) or not isinstance(cand.get("step_positions"), list):
                raise InvalidRequest(f"candidates[{i}]", 'a token candidate needs "ids" and "step_positions" lists')
            candidates.append(TokenIds(cand["ids"], cand["step_positions"]))
        elif isinstance(cand, list):
            candidates.append(cand)
        else:
            raise InvalidRequest(f"candidates[{i}]", "must be a list of step strings")
    aggregates = obj.get("aggregates", [])
    if not isinstance(aggregates, list):
        raise InvalidRequest("aggregates", "must be a list of names")
    prefix = obj.get("prefix_steps", [])
    if not isinstance(prefix, list):
        raise InvalidRequest("prefix_steps", "must be a list of step strings")
    temperature = obj.get("soft_min_temperature", 0.1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InvalidRequest("soft_min_temperature", "must be a number")
    return ScoreRequest(
        problem=problem,
        candidates=candidates,
        prefix_steps=tuple(prefix),
        aggregates=tuple(aggregates),
        truncate_left=_flag(obj, "truncate_left", False),
        return_step_scores=_flag(obj, "return_step_scores", True),
        soft_min_temperature=float(temperature),
    )


class LineError(InvalidRequest):
    """A line that is not a JSON object at all: where in the line (1-based `column`) it went wrong."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__("line", message)
        self.column = column


def decode_line(raw: bytes) -> Any:
    """One input line -> its JSON value; LineError says where it is not UTF-8 or not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = exc.start + 1  # a byte column: the line has no characters there
        raise LineError(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {column})", column) from None
    if text.startswith("\ufeff"):  # a byte-order mark some editors write at the start of a file
        text = " " + text[1:]  # a space keeps every later column where the user sees it
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"not JSON ({exc.msg} at column {exc.colno})", exc.colno) from None


def result_json(result: ScoreResult) -> dict[str, Any]:
    out = []
    for cand in result.candidates:
        item: dict[str, Any] = {
            "step_scores": cand.step_scores,
            "aggregates": dict(cand.aggregates),
            "num_tokens": cand.num_tokens,
        }
        if cand.num_truncated_steps:
            item["num_truncated_steps"] = cand.num_truncated_steps
        if cand.cached_tokens:  # tokens an earlier line computed (the prefix cache)
            item["cached_tokens"] = cand.cached_tokens
        out.append(item)
    return {"candidates": out}


class OutputClosed(Exception):
    """Whoever reads stdout stopped (`stepscore score in.jsonl | head`): stop scoring, quietly."""


async def score_lines(engine: Any, source: IO[bytes], sink: IO[str], concurrency: int) -> int:
    """Score every non-blank line of `source` through `engine`, writing results to `sink` in input order.
    Returns the number of lines that failed; raises OutputClosed when the sink's reader went away."""
    window: asyncio.Queue[tuple[int, asyncio.Task[ScoreResult] | StepscoreError]] = asyncio.Queue(concurrency)
    # exactly `concurrency` lines scored at once: with 1, each line starts after the previous one is scored,
    # so a file of growing chains finds each earlier chain in the prefix cache
    running = asyncio.Semaphore(concurrency)
    # every scoring task started and not yet written: the producer may be holding one it has not put in the
    # window yet, so the window alone does not know them all when the reader goes away
    started: set[asyncio.Task[ScoreResult]] = set()
    failures = 0

    async def produce() -> None:
        for number, raw in enumerate(source, start=1):
            if not raw.strip():
                continue  # a blank line (a trailing newline, a separator) is no request
            await running.acquire()
            try:
                scoring: asyncio.Task[ScoreResult] = asyncio.create_task(engine.score(parse_line(decode_line(raw))))
                started.add(scoring)
                scoring.add_done_callback(lambda _: running.release())
                task: asyncio.Task[ScoreResult] | StepscoreError = scoring
            except StepscoreError as exc:
                running.release()
                task = exc
            await window.put((number, task))
        await window.put((0, StepscoreError("end")))

    producer = asyncio.create_task(produce())
    try:
        while True:
            number, task = await window.get()
            if number == 0:
                break
            try:
                if isinstance(task, StepscoreError):
                    raise task
                started.discard(task)  # from here on, awaiting it here retrieves its outcome (or cancels it)
                obj = result_json(await task)
            except StepscoreError as exc:
                failures += 1
                print(f"line {number}: {exc}", file=sys.stderr)
                obj = {"error": error_json(exc, number)}
            try:
                sink.write(json.dumps(obj, ensure_ascii=False) + "\n")
            except BrokenPipeError:
                raise OutputClosed from None
        await producer
        try:
            sink.flush()
        except BrokenPipeError:
            raise OutputClosed from None
    finally:
        # lines read but not written: their scoring is no longer wanted. Each task is awaited after its cancel,
        # so that one that already failed (the engine shutting down) is retrieved rather than logged at exit
        producer.cancel()
        for scoring in started:
            scoring.cancel()
        await asyncio.gather(producer, *started, return_exceptions=True)
    return failures


def error_json(exc: StepscoreError, line: int) -> dict[str, Any]:
    field = getattr(exc, "field", None)
    column = getattr(exc, "column", None)
    return {
        "line": line,
        **({"column": column} if column is not None else {}),
        "type": "InvalidRequest" if isinstance(exc, LineError) else type(exc).__name__,
        "message": str(exc),
        **({"field": field} if field else {}),
    }


def run_score(args: argparse.Namespace) -> int:
    from stepscore.runtime.engine import Engine

    bundle = bundle_path(args.bundle)
    source_name = args.input

    async def main() -> int:
        engine = Engine.from_bundle(bundle, args.device, engine_config(args), engine_devices(args))
        async with engine:
            if source_name == "-":
                return await score_lines(engine, sys.stdin.buffer, sys.stdout, args.concurrency)
            try:
                source = open(source_name, "rb")  # apart from the `with`: only a failed open is "cannot read"
            except OSError as exc:
                raise ConfigError(f"cannot read {source_name}: {exc.strerror}") from exc
            with source:
                return await score_lines(engine, source, sys.stdout, args.concurrency)

    try:
        failures = asyncio.run(main())
    except OutputClosed:
        # as Unix tools do when the reader leaves (`| head`): stop, say nothing, exit 0; stdout now points at
        # /dev/null so that the interpreter's last flush at exit does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 1 if failures else 0
