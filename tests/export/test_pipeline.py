"""End-to-end export of every family, the validation gate, the bundle it writes, and the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stepscore.cli import main
from stepscore.errors import ValidationFailed
from stepscore.runtime.bundle import load_bundle
from tests.helpers.tiny_models import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_every_family_exports_and_validates_fp32(tiny_bundle: Callable[..., Path], kind: str) -> None:
    manifest = load_bundle(tiny_bundle(kind, "fp32")).manifest
    v = manifest.validation
    assert v["passed"] is True and v["precision"] == "fp32"
    assert v["max_abs_diff"] <= 1e-4
    # packed rows (several sequences, shared prefixes) checked as well as each candidate alone
    assert v["max_abs_diff_packed"] <= 1e-4 and v["packed_rows"] >= 1
    assert len(v["per_step_max_abs_diff"]) >= 1
    assert set(manifest.files) >= {"model.onnx", "tokenizer.json"}


@pytest.mark.parametrize("kind", ["qwen-prm", "math-shepherd", "orm"])
def test_fp16_export_validates_within_fp16_tolerance(tiny_bundle: Callable[..., Path], kind: str) -> None:
    v = load_bundle(tiny_bundle(kind, "fp16")).manifest.validation
    assert v["passed"] is True and v["tolerance"] == 2e-2
    assert v["max_abs_diff"] <= 2e-2


def test_manifest_records_everything_the_runtime_needs(tiny_bundle: Callable[..., Path]) -> None:
    m = load_bundle(tiny_bundle("qwen-prm", "fp16")).manifest
    j = m.to_json()
    assert j["schema_version"] == 1 and j["stepscore_version"]
    assert j["family"] == "token_cls" and j["preset"] == "qwen-prm"
    assert j["graph"]["precision"] == "fp16" and j["graph"]["opset"] >= 17
    assert j["graph"]["inputs"] == ["input_ids", "position_ids", "attn_end", "step_positions"]
    assert j["source"]["architecture"] == "Qwen2ForProcessRewardModel"
    assert j["format"]["prompt"] and j["format"]["step"]
    assert all(len(f["sha256"]) == 64 for f in j["files"].values())


def test_validation_gate_fails_on_a_wrong_graph(
    tiny_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stepscore.export.pipeline as pipeline
    from stepscore.export.weights import WeightStore

    real_get = WeightStore.get

    def corrupt(self: WeightStore, name: str) -> np.ndarray:
        arr = real_get(self, name)
        return arr * 1.5 if name.endswith("layers.1.mlp.down_proj.weight") else arr

    monkeypatch.setattr(WeightStore, "get", corrupt)
    out = tmp_path / "bad"
    with pytest.raises(ValidationFailed, match="differs from the PyTorch reference"):
        pipeline.export_model(str(tiny_model("trl")), out, precision="fp32", progress=lambda _: None)
    assert not out.exists()  # nothing unvalidated is left behind
    assert not list(tmp_path.glob(".bad.*"))


def test_cli_export_and_errors(tiny_model: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    assert main(["export", str(tiny_model("skywork")), str(out), "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/4] load", "[2/4] export", "[3/4] structure", "[4/4] validate", "peak memory"):
        assert stage in printed
    assert main(["export", str(tiny_model("skywork")), str(out)]) == 2  # exists, no --force
    err = capsys.readouterr().err
    assert "pass --force" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "c")]) == 2
    assert "no such folder" in capsys.readouterr().err
