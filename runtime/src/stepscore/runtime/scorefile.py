"""`stepscore score [BUNDLE] IN.jsonl`: score a JSON-lines file, one result line per input line, in order."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import IO, Any

from stepscore.errors import ConfigError, InvalidRequest, StepscoreError
from stepscore.runtime.flags import add_engine_args, add_flag, bundle_path, engine_config, engine_devices
from stepscore.runtime.types import ScoreRequest, ScoreResult, TokenIds

# --- score ---------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "score",
        help="score a JSON-lines file; one JSON line per input line on stdout",
        description='Input lines: {"problem": str, "candidates": [[step, ...], ...], "aggregates": ["min", ...]} '
        '(aggregates, "truncate_left" and "return_step_scores" optional). Output lines: {"candidates": '
        '[{"step_scores": [...], "aggregates": {...}, "num_tokens": int}, ...]}, or {"error": {...}} for a bad '
        "line (also reported on stderr with its line number); the other lines are still scored.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[BUNDLE] IN.jsonl",
        help="bundle directory (default: the embedded model) and the input file ('-' for stdin)",
    )
    add_flag(p, "--concurrency", 256, int, "lines in flight at once")
    add_flag(p, "--log-level", "warning", str, "logging level", choices=("debug", "info", "warning", "error"))
    add_engine_args(p)
    p.set_defaults(run=run_score)


def parse_line(obj: Any) -> ScoreRequest:
    """A JSON object from an input line -> ScoreRequest (InvalidRequest names the field)."""
    if not isinstance(obj, dict):
        raise InvalidRequest("line", "must be a JSON object")
    problem = obj.get("problem", "")
    candidates_raw = obj.get("candidates")
    if not isinstance(candidates_raw, list):
        raise InvalidRequest("candidates", "must be a list of candidates (each a list of step strings)")
    candidates: list[list[str] | TokenIds] = []
    for i, cand in enumerate(candidates_raw):
        if isinstance(cand, dict):
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
    return ScoreRequest(
        problem=problem,
        candidates=candidates,
        prefix_steps=tuple(prefix),
        aggregates=tuple(aggregates),
        truncate_left=bool(obj.get("truncate_left", False)),
        return_step_scores=bool(obj.get("return_step_scores", True)),
    )


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
        out.append(item)
    return {"candidates": out}


async def score_lines(engine: Any, source: IO[bytes], sink: IO[str], concurrency: int) -> int:
    """Score every line of `source` through `engine`, writing results to `sink` in input order."""
    window: asyncio.Queue[tuple[int, asyncio.Task[ScoreResult] | StepscoreError]] = asyncio.Queue(concurrency)
    failures = 0

    async def produce() -> None:
        for number, raw in enumerate(source, start=1):
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise InvalidRequest("line", f"not UTF-8 (byte {exc.start})") from None
                except json.JSONDecodeError as exc:
                    raise InvalidRequest("line", f"not JSON ({exc.msg} at column {exc.colno})") from None
                task: asyncio.Task[ScoreResult] | StepscoreError = asyncio.create_task(engine.score(parse_line(obj)))
            except StepscoreError as exc:
                task = exc
            await window.put((number, task))
        await window.put((0, StepscoreError("end")))

    producer = asyncio.create_task(produce())
    while True:
        number, task = await window.get()
        if number == 0:
            break
        try:
            if isinstance(task, StepscoreError):
                raise task
            obj = result_json(await task)
        except StepscoreError as exc:
            failures += 1
            field = getattr(exc, "field", None)
            print(f"line {number}: {exc}", file=sys.stderr)
            obj = {
                "error": {
                    "line": number,
                    "type": type(exc).__name__,
                    "message": str(exc),
                    **({"field": field} if field else {}),
                }
            }
        sink.write(json.dumps(obj, ensure_ascii=False) + "\n")
    await producer
    sink.flush()
    return failures


def run_score(args: argparse.Namespace) -> int:
    from stepscore.runtime.engine import Engine

    if len(args.paths) > 2:
        raise ConfigError("usage: stepscore score [BUNDLE] IN.jsonl")
    bundle = bundle_path(args.paths[0] if len(args.paths) == 2 else None)
    source_name = args.paths[-1]

    async def main() -> int:
        engine = Engine.from_bundle(bundle, args.device, engine_config(args), engine_devices(args))
        async with engine:
            if source_name == "-":
                return await score_lines(engine, sys.stdin.buffer, sys.stdout, args.concurrency)
            try:
                with open(source_name, "rb") as source:
                    return await score_lines(engine, source, sys.stdout, args.concurrency)
            except OSError as exc:
                raise ConfigError(f"cannot read {source_name}: {exc.strerror}") from exc

    failures = asyncio.run(main())
    return 1 if failures else 0
