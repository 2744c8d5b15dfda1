"""The `stepscore` command: one entry point, a subcommand per job.

    stepscore export MODEL OUT     turn a trained PRM into a validated ONNX bundle
    stepscore score  [BUNDLE] IN   score a JSON-lines file, one result line per input line
    stepscore serve  [BUNDLE]      the gRPC service
    stepscore bench  ...           latency / throughput on real search traffic
    stepscore demo                 the embedded default model end to end

Each subcommand lives beside the code it drives; this module only dispatches, and turns stepscore's
errors into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stepscore import __version__
from stepscore.errors import StepscoreError, ValidationFailed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepscore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stepscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from stepscore.export import cli as export_cli
    from stepscore.runtime import cli as runtime_cli

    export_cli.add_parser(sub)
    runtime_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
