"""Flags shared by the subcommands: the engine's (score, serve, bench), and the helpers every subcommand
uses so that each flag can also come from an environment variable STEPSCORE_<FLAG> (dashes as
underscores), named in its --help. A container can then be configured without a command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stepscore.errors import ConfigError
from stepscore.runtime.config import PLAIN_ROWS, EngineConfig, PlainRows
from stepscore.runtime.limits import RequestLimits

T = TypeVar("T")


def env_name(flag: str, scope: str = "") -> str:
    """--max-batch-tokens -> STEPSCORE_MAX_BATCH_TOKENS; with scope "bench": STEPSCORE_BENCH_MAX_BATCH_TOKENS.

    A flag that means the same in every subcommand (--device, --port, --token) has one variable; a flag
    whose meaning is a subcommand's own (bench's --concurrency is a list, score's a number) is scoped, so
    that a variable set for one subcommand never changes or breaks another."""
    return "STEPSCORE_" + (f"{scope.upper()}_" if scope else "") + flag.lstrip("-").upper().replace("-", "_")


def env_default(flag: str, default: T, cast: Callable[[str], T], env: str | None = None) -> T:
    """The value of STEPSCORE_<FLAG> (or `env`) if set (cast), else `default`."""
    name = env or env_name(flag)
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not valid ({exc})") from exc


def env_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def add_flag(
    group: Any,
    flag: str,
    default: T,
    cast: Callable[[str], T],
    help: str,
    *,
    choices: Sequence[T] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    shown: str | None = None,
    scope: str = "",
    nargs: int | None = None,
    aliases: Sequence[str] = (),
) -> None:
    """One option whose default may come from the environment; --help names the variable and the default
    (`shown` replaces the default's text where the value alone would mislead, e.g. "the device's").

    `scope` names the subcommand for flags whose meaning is its own (see env_name). With `nargs`, the
    option takes that many values, and the variable holds them separated by spaces."""
    env = env_name(flag, scope)
    default_text = shown if shown is not None else ("" if default in (None, "") else str(default))
    note = f"env {env}" + (f"; default {default_text}" if default_text else "")
    value: Any
    if nargs is None:
        value = env_default(flag, default, cast, env)
    else:

        def cast_all(raw: str) -> Any:
            parts = raw.split()
            if len(parts) != nargs:
                raise ValueError(f"expected {nargs} values separated by spaces")
            return tuple(cast(part) for part in parts)

        value = env_default(flag, default, cast_all, env)
    group.add_argument(
        *aliases,
        flag,
        type=cast,
        default=value,
        choices=choices,
        metavar=metavar,
        nargs=nargs,
        help=f"{help} [{note}]".replace("%", "%%"),
    )


def add_switch(group: Any, flag: str, help: str, scope: str = "") -> None:
    """An on/off option, off unless given (or STEPSCORE_<FLAG>=1)."""
    env = env_name(flag, scope)
    group.add_argument(
        flag,
        action="store_true",
        default=env_default(flag, False, env_flag, env),
        help=f"{help} [env {env}=1]".replace("%", "%%"),
    )


def add_bundle_arg(p: argparse.ArgumentParser, nargs: str = "?") -> None:
    """The positional BUNDLE every subcommand that scores takes, in the same place with the same default."""
    p.add_argument(
        "bundle",
        nargs=nargs,
        metavar="BUNDLE",
        default=env_default("bundle", None, str),
        help="bundle directory written by `stepscore export` [env STEPSCORE_BUNDLE; default: the embedded model]",
    )


def plain_rows(raw: str) -> PlainRows:
    for choice in PLAIN_ROWS:
        if raw == choice:
            return choice
    raise ValueError(f"expected one of {', '.join(PLAIN_ROWS)}")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = p.add_argument_group("engine")
    add_flag(g, "--device", "cpu", str, "cpu, cuda or cuda:N")
    add_flag(g, "--devices", "", str, "several GPUs behind one queue, e.g. 0,1 (overrides --device)")
    add_flag(
        g,
        "--max-batch-tokens",
        d.max_batch_tokens,
        int,
        "tokens per engine run, padding included; -1: the device's default (2048 on CPU, 16384 on CUDA)",
    )
    add_flag(g, "--max-wait-ms", d.max_wait_ms, float, "longest an idle device waits for a batch to fill")
    add_flag(g, "--row-tokens", d.row_tokens, int, "packed row length")
    add_flag(
        g, "--max-queued-requests", d.max_queued_requests, int, "requests admitted at once; more are refused as overloaded"
    )
    add_flag(g, "--max-queued-tokens", d.max_queued_tokens, int, "tokens admitted at once")
    add_flag(g, "--max-seq-len", 0, int, "refuse candidates longer than this", shown="the bundle's limit")
    add_flag(g, "--threads", 0, int, "onnxruntime threads per session", shown="onnxruntime's choice")
    add_flag(
        g,
        "--compute-nice",
        d.compute_nice,
        int,
        "niceness (0-19) of the compute threads (onnxruntime, tokenizing, packing), so that answering calls goes "
        "first (Linux; 10 on a dedicated host or container: refusals under overload p99 <= 3 ms instead of <= "
        "7.5 ms on 2 cores); 0: the process's own",
    )
    add_switch(g, "--no-prefix-sharing", "compute shared prefixes once per candidate instead of once per batch")
    add_switch(g, "--no-packing", "one padded row per candidate instead of packed rows")
    add_flag(
        g,
        "--plain-rows",
        d.plain_rows,
        plain_rows,
        "rows without a shared prefix through the bundle's plain-row graph (no attention bias, flash attention on "
        "CUDA): when the cost model prefers it, for every batch (no prefix cache then), or never; with the prefix "
        "cache on, batches run the cached graph",
        choices=PLAIN_ROWS,
    )
    add_flag(
        g,
        "--plain-cost",
        d.plain_cost,
        float,
        "a plain-row token's cost relative to a tree-row token, for --plain-rows auto",
        shown="measured at start-up (else 0.9 on CPU, 0.75 on CUDA)",
    )
    add_flag(
        g,
        "--run-overhead-tokens",
        d.run_overhead_tokens,
        float,
        "a run's fixed cost in tokens: batches of mixed lengths run one length class at a time when that is "
        "cheaper (0: always one run per batch)",
        shown="measured at start-up (else 16 on CPU, off on CUDA)",
    )
    add_switch(
        g,
        "--no-cost-model",
        "do not time the graph at start-up (cached in the bundle folder); use the fixed per-device defaults",
    )
    add_switch(g, "--no-verify", "skip the sha256 check of the bundle's files at load (sizes are still checked)")
    add_flag(g, "--text-cache-mb", d.text_cache_bytes >> 20, int, "memory for memoised tokenizations of repeated text (MiB)")
    add_flag(
        g,
        "--cache-mb",
        -1,
        int,
        "memory for the prefix cache (MiB): K/V and scores of steps earlier calls computed, so a search's next call "
        "runs only its new steps; 0 turns it off",
        shown="an eighth of the memory available at start-up",
    )
    add_limit_args(p)


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """Request sizes refused with INVALID_ARGUMENT before any tokenization (stepscore.runtime.limits)."""
    d = RequestLimits()
    g = p.add_argument_group("request limits (refused before any tokenization; reported by Info)")
    add_flag(g, "--max-candidates", d.max_candidates, int, "candidates per request")
    add_flag(g, "--max-steps", d.max_steps, int, "steps per candidate, prefix steps included")
    add_flag(g, "--max-problem-chars", d.max_problem_chars, int, "characters of the problem")
    add_flag(g, "--max-step-chars", d.max_step_chars, int, "characters of one step")
    add_flag(
        g,
        "--max-request-chars",
        d.max_request_chars,
        int,
        "characters formatted per request: problem and prefix steps once per candidate, plus every step",
    )


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(
        max_candidates=args.max_candidates,
        max_steps=args.max_steps,
        max_problem_chars=args.max_problem_chars,
        max_step_chars=args.max_step_chars,
        max_request_chars=args.max_request_chars,
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
        compute_nice=args.compute_nice,
        share_prefixes=not args.no_prefix_sharing,
        pack_rows=not args.no_packing,
        plain_rows=args.plain_rows,
        plain_cost=args.plain_cost,
        run_overhead_tokens=args.run_overhead_tokens,
        verify_bundle=not args.no_verify,
        measure_cost=not args.no_cost_model,
        limits=request_limits(args),
        text_cache_bytes=args.text_cache_mb << 20,
        cache_bytes=-1 if args.cache_mb == -1 else args.cache_mb << 20,  # any other negative: refused by the config
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
