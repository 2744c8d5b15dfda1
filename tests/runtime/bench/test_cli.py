"""`stepscore bench` end to end on a tiny bundle and the synthetic workload."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.errors import ConfigError
from stepscore.runtime.bench import cli


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stepscore")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_synthetic(tiny_bundle: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = [
        "--bundle", str(tiny_bundle("qwen-prm")),
        "--workload", "synthetic",
        "--limit", "4",
        "--synthetic-scale", "0.1",
        "--truncate-left",
        "--concurrency", "1,2",
        "--rate-fractions", "0.5",
        "--warmup", "1",
        "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip
    args = _args(*argv)
    assert args.run(args, argv) == 0
    data = json.loads((out / "results.json").read_text())
    points = [(p["system"], p["mode"], p["concurrency"]) for p in data["points"]]
    assert points == [
        ("engine", "closed", 1),
        ("engine", "closed", 2),
        ("engine", "open", None),
        ("naive-ort", "closed", 1),
        ("naive-ort", "open", None),
    ]
    assert all(p["errors"] == 0 and p["tokens_per_s"] > 0 and p["latency_ms"]["p50"] > 0 for p in data["points"])
    assert data["points"][0]["batch_fill"] > 0 and data["points"][3]["batch_fill"] is None
    assert data["meta"]["workloads"][0]["requests"] == 4 and "qwen-prm" in data["meta"]["model"]
    assert (out / "results.md").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert sum(1 for line in printed if line.startswith(("engine ", "naive-ort "))) == 5  # one line per sweep point


def test_bench_refuses_contradictions(tiny_bundle: Callable[..., Path]) -> None:
    bundle = str(tiny_bundle("qwen-prm"))
    for argv, message in (
        (["--bundle", bundle, "--serve", "--target", "h:1"], "--serve"),
        (["--bundle", bundle, "--systems", "hf-eager"], "--hf-model"),
        (["--bundle", bundle, "--systems", "gpu"], "unknown"),
        (["--target", "h:1", "--hf-model", "m"], "--bundle"),
        (["--bundle", bundle, "--metrics-url", "http://x/metrics"], "--target"),
    ):
        with pytest.raises(ConfigError, match=message):
            cli.plan_systems(_args(*argv))
    assert len(cli.plan_systems(_args("--target", "h:1"))) == 1  # a server alone needs no bundle
