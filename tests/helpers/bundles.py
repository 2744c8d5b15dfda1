"""Exported test bundles, optionally kept in a folder shared between test runs.

`.ci/package` runs the runtime and service tests a second time in an environment that has only the runtime
wheel (no torch, so no exporter). The first run, in the development environment, writes every bundle it
exports into `$STEPSCORE_TEST_BUNDLES`; the second reads them from there. Without the variable each run
exports into its own temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.runtime.bundle import Precision

CACHE_ENV = "STEPSCORE_TEST_BUNDLES"


def exported_bundle(key: str, scratch: Path, build_model: Callable[[Path], Path], precision: Precision = "fp32") -> Path:
    """The bundle named `key`: from the shared folder when it is there, else exported from `build_model(dir)`
    (and stored in the shared folder when one is set). Skips, saying why, where it cannot be exported."""
    cache = os.environ.get(CACHE_ENV)
    if cache and (Path(cache) / key / "manifest.json").is_file():
        return Path(cache) / key
    pytest.importorskip("torch", reason=f"exporting test bundle {key!r} needs torch; {CACHE_ENV} has no copy of it")
    from stepscore.export.pipeline import export_model

    out = scratch / key
    export_model(str(build_model(scratch / f"{key}-model")), out, precision=precision, progress=lambda _: None)
    if cache:
        # copy then rename: a concurrent reader never sees a half-written bundle
        partial = Path(cache) / f".{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(out, partial)
        partial.rename(Path(cache) / key)
    return out
