"""Serving must not need torch (nor transformers, nor onnx): the runtime runs with them made unimportable."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
for name in ("torch", "transformers", "onnx", "onnxscript", "safetensors"):
    sys.modules[name] = None  # any import of these now fails
from stepscore.cli import build_parser
build_parser()  # every subcommand's parser, export's included, loads without them
from stepscore.runtime.default_model import default_bundle
from stepscore.runtime.engine import SyncEngine
from stepscore.runtime.service.server import Server
from stepscore.runtime.client import Client
with SyncEngine(default_bundle()) as engine:
    result = engine.score("(2+3)*4", [["2+3=5", "5*4=20"]], aggregates=("min",))
print(result.candidates[0].aggregates["min"])
"""


def test_runtime_and_service_import_and_score_without_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 0.5 < float(proc.stdout.strip().splitlines()[-1]) <= 1.0
