"""Training arguments saved beside a checkpoint are read without running anything the pickle names."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from stepscore.export.training_args import saved_training_arg


@dataclasses.dataclass
class PRMConfig:
    output_dir: str
    step_separator: str = "\n"


class Exploit:
    """Unpickling this with the real classes would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_read_from_the_folder_its_parent_or_config(tmp_path: Path) -> None:
    import torch

    run = tmp_path / "run"
    checkpoint = run / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    assert saved_training_arg(checkpoint, {}, "step_separator") is None
    assert saved_training_arg(checkpoint, {"step_separator": "\n\n"}, "step_separator") is not None
    torch.save(PRMConfig("run", "\n\n"), run / "training_args.bin")  # the output folder holds them too
    found = saved_training_arg(checkpoint, {}, "step_separator")
    assert found is not None and found.value == "\n\n" and "run/training_args.bin" in found.where
    torch.save(PRMConfig("run", " | "), checkpoint / "training_args.bin")  # the checkpoint's own come first
    found = saved_training_arg(checkpoint, {"step_separator": "x"}, "step_separator")
    assert found is not None and found.value == " | "


def test_nothing_in_the_pickle_runs(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "ran"
    torch.save({"step_separator": Exploit(marker)}, tmp_path / "training_args.bin")
    assert saved_training_arg(tmp_path, {}, "step_separator") is None  # not an arguments object: nothing read
    torch.save(PRMConfig("x", Exploit(marker)), tmp_path / "training_args.bin")  # type: ignore[arg-type]
    found = saved_training_arg(tmp_path, {}, "step_separator")
    assert found is not None and not isinstance(found.value, str)  # an inert stand-in, not a separator
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_unreadable_files_are_no_answer(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "training_args.bin").write_bytes(content)
    assert saved_training_arg(tmp_path, {}, "step_separator") is None
