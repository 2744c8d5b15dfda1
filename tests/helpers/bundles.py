"""Exported test bundles, optionally kept in a folder shared between test runs.

`.ci/package` runs the runtime and service tests a second time in an environment that has only the runtime
wheel (no torch, so no exporter). The first run, in the development environment, writes every bundle it
exports into `$STEPSCORE_TEST_BUNDLES`; the second reads them from there. Without the variable each run
exports into its own temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


DIGEST_KEY = "manifest_sha256"


def manifest_digest(obj: dict[str, Any]) -> str:
    """The manifest digest as the format defines it (stepscore.runtime.bundle), written out independently here so
    that the tests pin the format: sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of every key but
    the digest's own."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None], reseal: bool = True) -> None:
    """Apply `edit` to a bundle's manifest.json. `reseal` recomputes the manifest's own digest, as someone who
    edits a manifest on purpose would: what load refuses then is the edit's meaning, not the stale digest.
    File hashes are recomputed for every file the manifest lists that exists (an edited path is pointed at a
    copy of the same file)."""
    path = directory / "manifest.json"
    obj = json.loads(path.read_text(encoding="utf-8"))
    edit(obj)
    for name, entry in obj.get("files", {}).items():
        file = directory / name
        if file.is_file():
            entry["sha256"], entry["size"] = hashlib.sha256(file.read_bytes()).hexdigest(), file.stat().st_size
    if reseal:
        obj[DIGEST_KEY] = manifest_digest(obj)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
