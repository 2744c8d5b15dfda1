"""Runtime subcommands: `score` (JSON lines in, JSON lines out) and the shared engine flags.

Every engine flag can also be set by an environment variable STEPSCORE_<FLAG> (dashes as underscores),
so a container can be configured without a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from stepscore.errors import ConfigError, StepscoreError
from stepscore.runtime.config import PLAIN_ROWS, EngineConfig, PlainRows
from stepscore.runtime.types import ScoreRequest, ScoreResult, TokenIds

T = TypeVar("T")


def env_default(flag: str, default: T, cast: Callable[[str], T]) -> T:
    """The value of STEPSCORE_<FLAG> if set (cast), else `default`."""
    name = "STEPSCORE_" + flag.upper().replace("-", "_")
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not valid ({exc})") from exc


def plain_rows(raw: str) -> PlainRows:
    for choice in PLAIN_ROWS:
        if raw == choice:
            return choice
    raise ValueError(f"expected one of {', '.join(PLAIN_ROWS)}")


def env_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=env_default("device", "cpu", str), help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument(
        "--devices",
        default=env_default("devices", "", str),
        help="several GPUs behind one queue, e.g. 0,1 (overrides --device)",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=env_default("max-batch-tokens", d.max_batch_tokens, int),
        help=f"tokens per engine run, padding included (default {d.max_batch_tokens})",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=env_default("max-wait-ms", d.max_wait_ms, float),
        help=f"longest an idle device waits for a batch to fill (default {d.max_wait_ms})",
    )
    g.add_argument(
        "--row-tokens",
        type=int,
        default=env_default("row-tokens", d.row_tokens, int),
        help=f"packed row length (default {d.row_tokens})",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=env_default("max-queued-requests", d.max_queued_requests, int),
        help=f"requests admitted at once; more are refused as overloaded (default {d.max_queued_requests})",
    )
    g.add_argument(
        "--max-queued-tokens",
        type=int,
        default=env_default("max-queued-tokens", d.max_queued_tokens, int),
        help=f"tokens admitted at once (default {d.max_queued_tokens})",
    )
    g.add_argument(
        "--max-seq-len",
        type=int,
        default=env_default("max-seq-len", 0, int),
        help="refuse candidates longer than this (default: the bundle's limit)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=env_default("threads", 0, int),
        help="onnxruntime threads per session (default: onnxruntime's choice)",
    )
    g.add_argument(
        "--no-prefix-sharing",
        action="store_true",
        default=env_default("no-prefix-sharing", False, env_flag),
        help="compute shared prefixes once per candidate instead of once per batch",
    )
    g.add_argument(
        "--no-packing",
        action="store_true",
        default=env_default("no-packing", False, env_flag),
        help="one padded row per candidate instead of packed rows",
    )
    g.add_argument(
        "--plain-rows",
        choices=PLAIN_ROWS,
        default=env_default("plain-rows", d.plain_rows, plain_rows),
        help="rows without a shared prefix through the bundle's plain-row graph (no attention bias, flash "
        "attention on CUDA): when the cost model prefers it, for every batch, or never (default auto)",
    )
    g.add_argument(
        "--plain-cost",
        type=float,
        default=env_default("plain-cost", d.plain_cost, float),
        help="a plain-row token's cost relative to a tree-row token, for --plain-rows auto (default: 0.9 on CPU, 0.75 on CUDA)",
    )
    g.add_argument(
        "--run-overhead-tokens",
        type=float,
        default=env_default("run-overhead-tokens", d.run_overhead_tokens, float),
        help="a run's fixed cost in tokens: batches of mixed lengths run one length class at a time when "
        "that is cheaper (default: 16 on CPU, off on CUDA; 0: always one run per batch)",
    )
    g.add_argument(
        "--no-verify",
        action="store_true",
        default=env_default("no-verify", False, env_flag),
        help="skip the sha256 check of the bundle's files at load (sizes are still checked)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        row_tokens=args.row_tokens,
        max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens,
        max_seq_len=args.max_seq_len,
        intra_op_threads=args.threads,
        share_prefixes=not args.no_prefix_sharing,
        pack_rows=not args.no_packing,
        plain_rows=args.plain_rows,
        plain_cost=args.plain_cost,
        run_overhead_tokens=args.run_overhead_tokens,
        verify_bundle=not args.no_verify,
    )


def engine_devices(args: argparse.Namespace) -> list[int | str] | None:
    if not args.devices:
        return None
    out: list[int | str] = []
    for part in str(args.devices).split(","):
        part = part.strip()
        out.append(int(part) if part.isdigit() else part)
    return out


def bundle_path(path: str | None) -> Path:
    """The given bundle, or the embedded default model's bundle."""
    if path:
        return Path(path)
    from stepscore.runtime.default_model import default_bundle

    return default_bundle()


# --- score ---------------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
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
    p.add_argument("--concurrency", type=int, default=256, help="lines in flight at once (default 256)")
    p.add_argument("--log-level", default=env_default("log-level", "warning", str))
    add_engine_args(p)
    p.set_defaults(run=run_score)

    from stepscore.runtime.bench import cli as bench_cli
    from stepscore.runtime.default_model import demo
    from stepscore.runtime.service import cli as service_cli

    service_cli.add_parsers(sub)
    bench_cli.add_parser(sub)
    demo.add_parser(sub)


def parse_line(obj: Any) -> ScoreRequest:
    """A JSON object from an input line -> ScoreRequest (InvalidRequest names the field)."""
    from stepscore.errors import InvalidRequest

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
    from stepscore.errors import InvalidRequest

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
