"""The `stepscore` command: one parser, a subcommand per job.

    stepscore export MODEL OUT     turn a trained PRM into a validated ONNX bundle (the export project)
    stepscore score  [BUNDLE] IN   score a JSON-lines file, one result line per input line
    stepscore serve  [BUNDLE]      the gRPC service
    stepscore bench  [BUNDLE]      latency / throughput on real search traffic
    stepscore demo                 the embedded default model end to end

Each subcommand's parser lives beside the code it drives and registers itself through `add_parser(sub)`;
this module only builds the one parser, dispatches, and turns stepscore's errors into one line on stderr
and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from stepscore.errors import ConfigError, StepscoreError, ValidationFailed
from stepscore.runtime import scorefile
from stepscore.runtime.bench import cli as bench_cli
from stepscore.runtime.default_model import demo
from stepscore.runtime.service import cli as service_cli
from stepscore.version import __version__


def _add_export(sub: Any) -> None:
    """`stepscore export` comes from the export project (stepscore-export, which needs torch). Without it the
    subcommand still exists and says how to get it, instead of argparse's 'invalid choice'."""
    try:
        from stepscore.export import cli as export_cli
    except ImportError:
        p: argparse.ArgumentParser = sub.add_parser(
            "export", help="turn a trained PRM into a validated ONNX bundle (needs: pip install 'stepscore[export]')"
        )
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(run=_export_missing)
        return
    export_cli.add_parser(sub)


def _export_missing(args: argparse.Namespace) -> int:
    raise ConfigError("export needs the export project, which brings torch and transformers: pip install 'stepscore[export]'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepscore", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stepscore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_export(sub)
    scorefile.add_parser(sub)
    service_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # reads STEPSCORE_* defaults: a bad one is a one-line error too
    except StepscoreError as exc:
        print(f"stepscore: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:  # `stepscore` alone: what can I do?
        parser.print_help()
        return 0
    args.own_process = argv is None  # the command line is this process's own (`stepscore serve` may re-execute it)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.run(args)
        return code
    except ValidationFailed as exc:
        print(f"stepscore {args.command}: validation failed: {exc}", file=sys.stderr)
        return 3
    except StepscoreError as exc:
        print(f"stepscore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
