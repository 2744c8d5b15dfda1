"""Loading a bundle checks schema and hashes: tampering is an error, never a wrong score."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.errors import BundleError
from stepscore.runtime.bundle import Manifest, load_bundle


@pytest.fixture
def bundle_copy(tiny_bundle: Callable[..., Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle("trl"), tmp_path / "b"))


def test_round_trip(bundle_copy: Path) -> None:
    b = load_bundle(bundle_copy)
    assert Manifest.from_json(b.manifest.to_json()) == b.manifest


def test_flipped_byte_is_detected(bundle_copy: Path) -> None:
    path = bundle_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # sizes still match: only the hash pass catches it


def test_truncated_and_missing_files_are_detected(bundle_copy: Path) -> None:
    tok = bundle_copy / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:-10])
    with pytest.raises(BundleError, match="truncated or replaced"):
        load_bundle(bundle_copy, verify=False)
    tok.unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        load_bundle(bundle_copy)


def test_schema_and_contract_versions(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({**obj, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_bundle(bundle_copy)
    obj["graph"]["contract"] = 7
    path.write_text(json.dumps(obj))
    with pytest.raises(BundleError, match="re-export"):
        load_bundle(bundle_copy)
    path.write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(bundle_copy / "nope")
