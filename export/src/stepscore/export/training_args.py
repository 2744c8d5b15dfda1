"""Read a training argument a checkpoint was saved with, without running any of the saved code.

Hugging Face's Trainer saves its arguments beside every checkpoint as `training_args.bin`: `torch.save` of the
arguments object (a zip archive holding one pickle). A format detail such as TRL PRMTrainer's
`step_separator` is only written there, and a wrong separator moves every score. Unpickling with the real
classes would import and run whatever the pickle names, so the pickle is read with stand-ins instead: every
class it names becomes an inert object that only records its state. Nothing is imported, nothing runs.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINING_ARGS = "training_args.bin"


@dataclass(frozen=True)
class Found:
    value: Any
    where: str  # e.g. "checkpoint/training_args.bin (step_separator)"


class _Inert:
    """Stands in for any class a pickle names: accepts any arguments, keeps the state it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if isinstance(state, dict):
            self.state = {str(k): v for k, v in state.items()}


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("copyreg", "_reconstructor"):  # protocol < 2 objects: build an inert one
            return lambda *args: _Inert()
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return None  # tensor storages: training arguments hold none worth reading


def _read_pickled_object(path: Path) -> dict[str, Any] | None:
    """The attributes of the object `torch.save` wrote to `path`; None where the file is not one."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            raw = archive.read(name)
        obj = _InertUnpickler(io.BytesIO(raw)).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError):
        return None
    return obj.state if isinstance(obj, _Inert) else None


def saved_training_arg(model_dir: Path, config: Mapping[str, Any], key: str) -> Found | None:
    """`key` as the checkpoint was trained with: from the training arguments saved in the model folder or
    in the folder above it (a `checkpoint-N` folder sits inside the run's output folder, which holds them
    too), else from config.json. None when neither says."""
    for folder in (model_dir, model_dir.parent):
        path = folder / TRAINING_ARGS
        if path.is_file():
            state = _read_pickled_object(path)
            if state is not None and key in state:
                return Found(state[key], f"{path} ({key})")
    if key in config:
        return Found(config[key], f"config.json ({key})")
    return None
