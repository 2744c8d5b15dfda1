"""The embedded default model: a tiny arithmetic PRM that ships inside the package.

- `assets/checkpoint/`: the trained checkpoint (Qwen2.5-Math-PRM layout, a few MB), reproducible with
  `python -m stepscore.runtime.default_model.train --out DIR` (see train.py);
- `assets/bundle/`: that checkpoint exported by `stepscore export runtime/src/stepscore/runtime/default_model/assets/checkpoint
  BUNDLE` (fp32, the default for CPU serving; the tree and plain-row graphs share one copy of the weights in
  model.onnx.data), used by `stepscore serve`, `stepscore score` and `stepscore bench` when no bundle is
  given. Serving it needs no torch.

Its one input format: the problem is an arithmetic expression over small whole numbers (+, - and *, no
spaces, parentheses only where precedence needs them), e.g. `(2+3)*4`, evaluated left to right; each step
applies the next operation to the value so far, written `a<op>b=c` with no spaces, e.g. `2+3=5` then
`5*4=20` (arith.py). Anything else is outside what it was trained on and scores near 0.

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
