"""The generated code in protos/ is exactly what the .proto produces (reproducible)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("stepscore_pb2.py", "stepscore_pb2.pyi", "stepscore_pb2_grpc.py")


def test_generated_code_is_reproducible(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the code")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos/stepscore/v1/stepscore.proto"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for name in GENERATED:
        fresh = (tmp_path / "stepscore/v1" / name).read_text()
        committed = (ROOT / "runtime/src/stepscore/v1" / name).read_text()
        assert fresh == committed, f"runtime/src/stepscore/v1/{name} is stale: regenerate it (see the .proto header)"
