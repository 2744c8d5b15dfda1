"""The one `stepscore` command: every subcommand registered once, `stepscore` alone helps, errors are one line."""

from __future__ import annotations

import argparse
import os
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
