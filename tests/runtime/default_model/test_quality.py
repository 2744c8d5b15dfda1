"""The embedded default model: quality on held-out chains, measured through the shipped bundle with the
runtime (no torch), and the bundle's reproducibility from the shipped checkpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from stepscore.runtime.default_model import default_bundle, default_checkpoint
from stepscore.runtime.default_model.arith import Chain, Problem
from stepscore.runtime.default_model.evaluate import best_of_n, held_out, step_quality
from stepscore.runtime.engine import SyncEngine
from stepscore.runtime.types import ScoreRequest


@pytest.fixture(scope="module")
def engine() -> Iterator[SyncEngine]:
    eng = SyncEngine(default_bundle())
    yield eng
    eng.close()


def _scorer(engine: SyncEngine):  # type: ignore[no-untyped-def]
    def score(data: Sequence[tuple[Problem, Sequence[Chain]]]) -> list[list[npt.NDArray[np.float64]]]:
        requests = [ScoreRequest(p.text, [c.steps for c in chains]) for p, chains in data]
        results = engine.score_many(requests)
        out = []
        for r in results:
            assert not isinstance(r, BaseException), r
            out.append([np.array(c.step_scores, dtype=np.float64) for c in r.candidates])
        return out

    return score


def test_step_auroc_and_first_error_accuracy(engine: SyncEngine) -> None:
    quality = step_quality(held_out(seed=12345, problems=300, per_problem=4), _scorer(engine))
    assert quality.step_auroc >= 0.97, quality
    assert quality.first_error_accuracy >= 0.9, quality


def test_best_of_8_beats_majority_vote_and_random(engine: SyncEngine) -> None:
    result = best_of_n(held_out(seed=777, problems=300, per_problem=8), _scorer(engine))
    assert result.prm_min > result.majority + 0.05, result
    assert result.prm_min > result.random_pick + 0.2, result


def test_shipped_bundle_is_the_shipped_checkpoint_exported(tmp_path: Path, engine: SyncEngine) -> None:
    pytest.importorskip("torch", reason="re-exporting needs the export extra")
    from stepscore.export.pipeline import export_model
    from stepscore.runtime.bundle import load_bundle

    fresh = tmp_path / "bundle"
    export_model(str(default_checkpoint()), fresh, precision="fp32", progress=lambda _: None)
    shipped = load_bundle(default_bundle()).manifest
    again = load_bundle(fresh).manifest
    assert again.format == shipped.format and again.head == shipped.head and again.model == shipped.model
    assert again.graph == shipped.graph
    data = held_out(seed=5, problems=20, per_problem=4)
    with SyncEngine(fresh) as fresh_engine:
        a = _scorer(engine)(data)
        b = _scorer(fresh_engine)(data)
    # Dynamic batching may pack the two runs' chains into different rows, which reorders fp32 sums: a few 1e-6 apart
    # is rounding, a retrained or differently built graph moves scores by orders of magnitude more.
    for xs, ys in zip(a, b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)
