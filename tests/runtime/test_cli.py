"""The one `stepscore` command: every subcommand registered once, `stepscore` alone helps, errors are one line."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from stepscore.cli import build_parser, main
from stepscore.version import __version__


def _run(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "stepscore.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"export", "score", "serve", "bench", "demo"}


def test_bare_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("export", "score", "serve", "bench", "demo"):
        assert command in out


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"stepscore {__version__}"


def test_bad_environment_default_is_one_line_error() -> None:
    proc = _run("serve", "--help", env={"STEPSCORE_PORT": "not-a-port"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "stepscore: error: environment variable STEPSCORE_PORT='not-a-port' is not valid "
        "(invalid literal for int() with base 10: 'not-a-port')"
    ]


def test_export_without_the_export_project_says_how_to_get_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['stepscore.export'] = None  # the runtime installed alone\n"
        "from stepscore.cli import main\n"
        "sys.exit(main(['export', 'model', 'out']))\n"
    )
    proc = _run(code=code)
    assert proc.returncode == 2
    assert "pip install 'stepscore[export]'" in proc.stderr and "Traceback" not in proc.stderr


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_names_its_environment_variable() -> None:
    missing = []
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if "[env STEPSCORE_" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[-1]}")
    assert not missing, missing


def test_one_variable_means_one_thing_in_every_subcommand() -> None:
    # a variable set for one subcommand must not change the meaning of another's flag (bench's
    # --concurrency is a list, score's a number): shared names are shared meanings, of one type
    seen: dict[str, tuple[str, type]] = {}
    clashes = []
    for name, parser in _subparsers().items():
        for action in parser._actions:
            match = re.search(r"\[env (STEPSCORE_\w+)", action.help or "")
            if match is None or action.default is None:
                continue
            kind = type(action.default)
            first = seen.setdefault(match.group(1), (name, kind))
            if first[1] is not kind:
                clashes.append(f"{match.group(1)}: {first[0]} {first[1].__name__}, {name} {kind.__name__}")
    assert not clashes, clashes


def test_the_bundle_is_positional_in_every_subcommand_that_scores() -> None:
    for name in ("score", "serve", "bench"):
        usage = " ".join(_subparsers()[name].format_usage().split())
        assert "[BUNDLE]" in usage and "--bundle" not in usage, (name, usage)


def test_a_variable_for_bench_neither_breaks_nor_changes_score() -> None:
    # bench's --concurrency is a list: "1,4" set for it used to be read by score's --concurrency (a number)
    # too, and broke every subcommand; scoped, it reaches bench alone
    env = {"STEPSCORE_BENCH_CONCURRENCY": "1,4", "STEPSCORE_BENCH_LIMIT": "7"}
    assert _run("score", "--help", env=env).returncode == 0
    os.environ.update(env)
    try:
        bench = build_parser().parse_args(["bench"])
        score = build_parser().parse_args(["score", "in.jsonl"])
    finally:
        for key in env:
            del os.environ[key]
    assert (bench.concurrency, bench.limit) == ("1,4", 7) and score.concurrency == 256
