"""Shared fixtures: tiny models of every family and their exported bundles, built once per session."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.runtime.bundle import Precision

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # a checkout beside ../shared, or the STEPSCORE_SHARED variable
    import os

    SHARED = Path(os.environ.get("STEPSCORE_SHARED", str(SHARED)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_model(kind) -> a Hugging Face-style folder of a tiny random model of that kind."""
    from tests.helpers.tiny_models import build

    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = build(kind, root / kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Callable[..., Path]:
    """tiny_bundle(kind, precision="fp32") -> an exported, validated bundle of that tiny model (read from
    $STEPSCORE_TEST_BUNDLES when that holds it: see tests/helpers/bundles.py)."""
    from tests.helpers.bundles import exported_bundle

    root = tmp_path_factory.mktemp("bundles")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, precision: Precision = "fp32") -> Path:
        key = (kind, precision)
        if key not in made:
            made[key] = exported_bundle(f"{kind}-{precision}", root, lambda _: tiny_model(kind), precision)
        return made[key]

    return get


@pytest.fixture(scope="session")
def real_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """real_tokenizer(name) -> a folder with tokenizer.json + tokenizer_config.json from ../shared/tokenizers.

    Skips (saying why) when ../shared is absent, as on a user's machine: the files are read by path and
    never copied into the repository.
    """
    root = tmp_path_factory.mktemp("tokenizers")

    def get(name: str) -> Path:
        src = SHARED / "tokenizers" / name
        if not (src / "tokenizer.json.gz").is_file():
            pytest.skip(f"real tokenizer {name} not available at {src} (../shared is absent)")
        dst = root / name
        if not dst.is_dir():
            dst.mkdir()
            with gzip.open(src / "tokenizer.json.gz", "rb") as fin, (dst / "tokenizer.json").open("wb") as fout:
                shutil.copyfileobj(fin, fout)
            shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
        return dst

    return get


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"real data not available at {path} (../shared is absent)")
    return path
