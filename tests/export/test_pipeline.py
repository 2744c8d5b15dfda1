"""End-to-end export of every family, the validation gate, the bundle it writes, and the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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
    # head size 16: the cached graph reads grouped K/V and each row's own past through GroupQueryAttention
    assert j["graph"]["cached_attention"] == "GroupQueryAttention"
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


# --- errors, the destination, signals, the bundle's files --------------------------------------------


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_truncated_checkpoint_is_one_line_from_the_real_command(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    model = _copy_model(tiny_model("trl"), tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "export", str(model), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"stepscore export: error: {weights}: truncated") and "download it again" in line
    assert not (tmp_path / "out").exists()


def test_unreadable_inputs_are_one_line(
    tiny_model: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_model(tiny_model("trl"), tmp_path / "m")
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + good[100:])
    assert "not a safetensors file" in _one_error_line(capsys, str(model), str(tmp_path / "o1"))
    weights.unlink()
    weights.mkdir()  # a folder where the weights file should be: unreadable
    assert "cannot read" in _one_error_line(capsys, str(model), str(tmp_path / "o2"))
    shutil.rmtree(weights)
    weights.write_bytes(good)
    (model / "tokenizer.json").write_text("{ broken")
    assert "not a tokenizer.json" in _one_error_line(capsys, str(model), str(tmp_path / "o3"))
    assert "no such file or folder" in _one_error_line(
        capsys, str(tiny_model("trl")), str(tmp_path / "o4"), "--tokenizer", str(tmp_path / "nope")
    )


def test_files_where_folders_belong_and_unwritable_outputs(
    tiny_model: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_model("trl"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is a file, not a folder" in _one_error_line(capsys, model, str(a_file))
    assert f"{a_file} is a file, not a folder" in _one_error_line(capsys, model, str(a_file / "bundle"))
    assert "is a file; pass the model's folder" in _one_error_line(capsys, str(a_file), str(tmp_path / "o"))
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: sysfs refuses even root
        if not Path("/sys").is_dir():
            pytest.skip("no /sys to stand for an unwritable folder (running as root)")
        unwritable = Path("/sys/stepscore-bundle")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        unwritable = locked / "bundle"
    assert f"cannot write the bundle into {unwritable.parent}" in _one_error_line(capsys, model, str(unwritable))


def test_force_replaces_only_a_bundle(
    tiny_model: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("years of work")
    line = _one_error_line(capsys, str(tiny_model("trl")), str(precious), "--force")
    assert "is not a stepscore bundle" in line and "even with --force" in line
    assert (precious / "notes.txt").read_text() == "years of work"  # untouched

    out = tmp_path / "bundle"
    assert main(["export", str(tiny_model("trl")), str(out)]) == 0
    first = (out / "manifest.json").read_text()
    assert main(["export", str(tiny_model("trl")), str(out), "--force", "--max-seq-len", "128"]) == 0
    assert (out / "manifest.json").read_text() != first and load_bundle(out).manifest.model.max_seq_len == 128
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_precision_follows_the_target_device_and_is_said(
    tiny_model: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tiny_model("trl")), str(tmp_path / "cpu")]) == 0
    assert "precision fp32 (chosen for --device cpu" in capsys.readouterr().out
    assert load_bundle(tmp_path / "cpu").manifest.graph.precision == "fp32"
    assert main(["export", str(tiny_model("trl")), str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    assert "precision fp16 (chosen for --device cuda" in capsys.readouterr().out
    assert load_bundle(tmp_path / "gpu").manifest.graph.precision == "fp16"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_export_removes_the_staging_folder(
    tiny_model: Callable[[str], Path], tmp_path: Path, sig: signal.Signals
) -> None:
    from stepscore.export.pipeline import export_model

    def progress(line: str) -> None:
        if line.startswith("[2/4]"):  # the graph is written: the staging folder is full
            assert list(tmp_path.glob(".out.*"))
            os.kill(os.getpid(), sig)

    # Ctrl-C as a terminal delivers it: a shell starting a command in the background (`cmd &`, no job control)
    # hands it SIGINT ignored, and Python then keeps it ignored (this test failed when CI was started that way)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit if sig == signal.SIGTERM else KeyboardInterrupt) as info:
            export_model(str(tiny_model("trl")), tmp_path / "out", precision="fp32", progress=progress)
    finally:
        signal.signal(signal.SIGINT, inherited)
    if isinstance(info.value, SystemExit):
        assert info.value.code == 128 + signal.SIGTERM  # the shell's "killed by SIGTERM"
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is only there during an export


def test_the_bundle_holds_one_copy_of_the_weights(tiny_bundle: Callable[..., Path]) -> None:
    import onnx

    bundle = tiny_bundle("qwen-prm")
    manifest = load_bundle(bundle).manifest
    inline = 0
    for name in ("model.onnx", "model_plain.onnx"):
        graph = onnx.load(str(bundle / name), load_external_data=False).graph
        for tensor in graph.initializer:
            external = any(e.key == "location" and e.value == "model.onnx.data" for e in tensor.external_data)
            if tensor.name.startswith(("model.", "head.")):
                assert external, f"{name}: parameter {tensor.name} is inside the graph file"
            inline += len(tensor.raw_data)
    assert inline < 4096  # only shapes and axes stay in the graph files
    params_bytes = 4 * manifest.model.num_parameters
    data = (bundle / "model.onnx.data").stat().st_size
    assert params_bytes <= data < 1.5 * params_bytes + (8 << 20)  # the parameters once (plus the rotary cache)


def test_escapes_on_the_command_line_reach_the_format(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "b"
    # what bash passes for "You check.\nBe strict." and "\n\n" in double quotes: backslash-n, not a newline
    argv = ["--preset", "math-shepherd-sal", "--system-prompt", "You check.\\nBe strict.", "--step-separator", "\\n\\n"]
    assert main(["export", str(tiny_model("math-shepherd")), str(out), *argv]) == 0
    fmt = load_bundle(out).manifest.format
    assert any(seg.text and "You check.\nBe strict.\n" in seg.text for seg in fmt.prompt)
    assert [seg.text for seg in fmt.separator] == ["\n\n"]
