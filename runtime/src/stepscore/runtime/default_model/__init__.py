"""The embedded default model: a tiny arithmetic PRM that ships inside the package.

- `assets/checkpoint/`: the trained checkpoint (Qwen2.5-Math-PRM layout, a few MB), reproducible with
  `python -m stepscore.runtime.default_model.train --out DIR` (see train.py);
- `assets/bundle/`: that checkpoint exported by `stepscore export runtime/src/stepscore/runtime/default_model/assets/checkpoint
  runtime/src/stepscore/runtime/default_model/assets/bundle --precision fp32 --external-data` (fp32: it serves on CPUs; external
  data: the tree and plain-row graphs share one copy of the weights), used by `stepscore serve` and
  `stepscore score` when no bundle is given. Serving it needs no torch.

`stepscore demo` (demo.py) exports the checkpoint afresh, serves it, and runs a best-of-N search
against it over gRPC.
"""

from __future__ import annotations

from pathlib import Path

from stepscore.errors import BundleError

ASSETS = Path(__file__).resolve().parent / "assets"


def default_checkpoint() -> Path:
    path = ASSETS / "checkpoint"
    if not (path / "model.safetensors").is_file():
        raise BundleError(f"the default model's checkpoint is missing from {path}; reinstall stepscore")
    return path


def default_bundle() -> Path:
    path = ASSETS / "bundle"
    if not (path / "manifest.json").is_file():
        raise BundleError(f"the default bundle is missing from {path}; reinstall stepscore or pass a bundle")
    return path
