"""Loading a bundle checks schema, hashes, its manifest's digest, containment and meaning: tampering is an
error, never a wrong score, and nothing outside the bundle folder is ever opened."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stepscore.errors import BundleError
from stepscore.runtime.bundle import DIGEST_KEY, Manifest, load_bundle, manifest_digest, write_manifest
from tests.helpers.bundles import edit_manifest
from tests.helpers.bundles import manifest_digest as helper_digest


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


# --- the manifest's own digest, its paths, its meaning ---------------------------------------------


def test_an_edited_manifest_is_detected_by_its_digest(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["format"].update(description="edited"), reseal=False)
    with pytest.raises(BundleError, match="does not match its manifest_sha256"):
        load_bundle(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m.pop(DIGEST_KEY), reseal=False)
    with pytest.raises(BundleError, match="no manifest_sha256"):
        load_bundle(bundle_copy)
    edit_manifest(bundle_copy, lambda m: None)  # resealed: loads again
    load_bundle(bundle_copy)


def _point(field: str, name: str) -> Callable[[dict[str, Any]], None]:
    """An edit pointing one manifest path at `name` (and listing `name` among the hashed files)."""

    def edit(m: dict[str, Any]) -> None:
        section, key = field.split(".")
        old = m[section][key]
        m[section][key] = name
        m["files"][name] = m["files"].pop(old)

    return edit


@pytest.mark.parametrize("field", ["graph.file", "graph.plain_file", "tokenizer.file"])
@pytest.mark.parametrize("name", ["../outside", "/OUTSIDE", "sub/inside", "..", "c:drive", "back\\slash"])
def test_every_manifest_path_is_a_plain_name_inside_the_bundle(bundle_copy: Path, field: str, name: str) -> None:
    source = {"graph.file": "model.onnx", "graph.plain_file": "model_plain.onnx", "tokenizer.file": "tokenizer.json"}[field]
    if name == "/OUTSIDE":
        name = str(bundle_copy.parent / "outside-abs")
    target = (bundle_copy / name) if not name.startswith("/") else Path(name)
    if name not in ("..",) and target.parent.is_dir():
        shutil.copy(bundle_copy / source, target)  # the outside copy is a valid file: only containment refuses it
    elif name == "sub/inside":
        (bundle_copy / "sub").mkdir()
        shutil.copy(bundle_copy / source, target)
    edit_manifest(bundle_copy, _point(field, name))
    with pytest.raises(BundleError, match=re.escape(f"manifest {field} {name!r} is not a plain file name")):
        load_bundle(bundle_copy)


def test_a_link_leading_outside_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-tokenizer.json"
    shutil.copy(bundle_copy / "tokenizer.json", outside)
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(outside)  # same bytes, same hash: only the link gives it away
    with pytest.raises(BundleError, match=r"tokenizer\.json is a link leading outside the bundle"):
        load_bundle(bundle_copy)


def test_an_outside_file_size_never_leaks(bundle_copy: Path, tmp_path: Path) -> None:
    secret = bundle_copy.parent / "secret.bin"
    secret.write_bytes(b"s" * 12345)

    def edit(m: dict[str, Any]) -> None:
        m["files"]["../secret.bin"] = {"sha256": "0" * 64, "size": 1}

    edit_manifest(bundle_copy, edit)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["../secret.bin"]["size"] = 1  # the edit helper hashed the real file: a probe would not know it
    m[DIGEST_KEY] = manifest_digest(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    assert "12345" not in str(err.value) and "files['../secret.bin']" in str(err.value)


def _retag(m: dict[str, Any]) -> None:
    """Move the step's read to another token, consistently in the format and the head (a hand edit)."""
    for seg in m["format"]["step"]:
        if seg.get("read") and seg.get("ids"):
            seg["ids"] = [seg["ids"][-1] + 1]
    m["head"]["tag_id"] += 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_retag, r"tag id 203 is '.*' in the bundle's tokenizer, but the manifest records 'Ċ'"),
        (lambda m: m["head"].update(tag_id=m["head"]["tag_id"] + 1), "is not the id the step's score is read at"),
        (lambda m: m["head"].update(family="value_head"), "family 'token_cls' but head.family 'value_head'"),
        (lambda m: m["head"].update(score="sigmoid", num_labels=1), "is not a token_cls head"),
        (lambda m: m["graph"].update(outputs=["scores"]), r"graph.outputs \('scores',\) are not the contract's"),
        (lambda m: m["head"].update(tag_token=None), "records no token text for its tag id"),
        (lambda m: m["format"]["prompt"].append({"ids": [10**6]}), r"format.prompt\[\d+\].ids\[0\] 1000000 is outside"),
    ],
)
def test_the_manifest_must_mean_what_it_says(bundle_copy: Path, edit: Callable[[dict[str, Any]], None], message: str) -> None:
    edit_manifest(bundle_copy, edit)  # resealed: only the meaning is wrong
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_candidate_ids_must_decode_to_their_recorded_tokens(tiny_bundle: Callable[..., Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_bundle("rlhflow"), tmp_path / "r"))
    assert load_bundle(copy).manifest.head.candidate_tokens == ("+", "-")
    edit_manifest(
        copy, lambda m: m["head"].update(candidate_ids=[m["head"]["candidate_ids"][1], m["head"]["candidate_ids"][0]])
    )
    with pytest.raises(BundleError, match="candidate 0 id 16 is '-' in the bundle's tokenizer, but the manifest records '\\+'"):
        load_bundle(copy)


def test_write_manifest_records_the_token_texts_and_the_digest(bundle_copy: Path) -> None:
    loaded = load_bundle(bundle_copy).manifest
    bare = Manifest.from_json({**loaded.to_json(), "head": {**loaded.to_json()["head"], "tag_token": None}})
    write_manifest(bundle_copy, bare)
    again = load_bundle(bundle_copy).manifest
    assert again.head.tag_token == "Ċ" and again == loaded


def test_the_digest_is_the_documented_one(bundle_copy: Path) -> None:
    # tests/helpers/bundles.py computes it independently: canonical JSON of every key but the digest
    obj = json.loads((bundle_copy / "manifest.json").read_text())
    assert obj[DIGEST_KEY] == helper_digest(obj) == manifest_digest(obj)
