"""The export gate: the graph must reproduce the PyTorch reference on sample step chains.

It runs the graph twice through the runtime's own packer and backend: every candidate alone, and all of
them packed into shared-prefix rows; the plain-row graph, when there is one, runs them all in one padded
batch. Each must match the reference within the precision's tolerance; the figures go into the manifest
and an export over tolerance exits non-zero.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from stepscore.errors import ValidationFailed
from stepscore.runtime import allocator
from stepscore.runtime.backend import OrtBackend
from stepscore.runtime.bundle import Precision, ScoreRule
from stepscore.runtime.cachedbatch import score_in_increments
from stepscore.runtime.packing import PackOptions, pack
from stepscore.runtime.prefixcache import PrefixCache
from stepscore.runtime.types import Formatted

TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 2e-2}
# scoring a chain in increments through the prefix cache vs at once: the same graph, so tighter in fp32
INCREMENTAL_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "fp16": 2e-2}


@dataclass(frozen=True)
class ValidationReport:
    precision: Precision
    tolerance: float
    max_abs_diff: float
    max_abs_diff_alone: float
    max_abs_diff_packed: float
    max_abs_diff_plain: float | None
    max_abs_diff_incremental: float
    incremental_tolerance: float
    per_step_max_abs_diff: list[float]
    num_chains: int
    num_steps: int
    packed_rows: int
    reference: str
    passed: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _diff(got: npt.NDArray[np.float64], want: npt.NDArray[np.float64], rule: ScoreRule) -> npt.NDArray[np.float64]:
    d = np.abs(got - want)
    if rule == "identity":  # raw rewards: compare relative to their size
        d = d / np.maximum(1.0, np.abs(want))
    return np.asarray(d)


def _return_freed_memory() -> None:
    # glibc keeps freed heap pages for reuse; hand them back so the next session does not add to the peak
    trim = allocator.malloc_trim()
    if trim is not None:  # None: not glibc, nothing to do
        trim(0)


def validate_graph(
    graph_path: Path,
    items: Sequence[Formatted],
    reference: Sequence[npt.NDArray[np.float64]],
    precision: Precision,
    rule: ScoreRule,
    reference_name: str,
    plain_graph_path: Path | None = None,
    cached_graph: tuple[Path, tuple[int, int, int]] | None = None,  # path, (layers, kv_heads, head_dim)
) -> ValidationReport:
    backend = OrtBackend(graph_path, "cpu")
    alone: list[npt.NDArray[np.float64]] = []
    for item in items:
        batch = pack([item], PackOptions(share_prefixes=False, row_tokens=1))
        alone.append(backend.run(batch).reshape(-1)[batch.item_reads[0]].astype(np.float64))
    packed_batch = pack(items, PackOptions(row_tokens=max(64, sum(i.num_tokens for i in items) // 2), min_shared=1))
    flat = backend.run(packed_batch).reshape(-1)
    packed = [flat[r].astype(np.float64) for r in packed_batch.item_reads]
    plain = None
    if plain_graph_path is not None:
        del backend  # one session, one copy of the weights, at a time: the peak of a large export
        gc.collect()
        _return_freed_memory()
        plain_backend = OrtBackend(None, "cpu", plain_graph_path=plain_graph_path)
        plain_batch = pack(items, PackOptions(plain_cost=0.0))
        assert plain_batch.seq_lens is not None and not plain_batch.leftover
        flat = plain_backend.run(plain_batch).reshape(-1)
        plain = [flat[r].astype(np.float64) for r in plain_batch.item_reads]
        del plain_backend
    worst_incremental = 0.0
    if cached_graph is not None:
        gc.collect()
        _return_freed_memory()
        worst_incremental = _incremental_diff(cached_graph, items, alone)

    longest = max(len(r) for r in reference)
    per_step = np.zeros(longest)
    worst_alone = worst_packed = worst_plain = 0.0
    for n, (got_a, got_p, want) in enumerate(zip(alone, packed, reference, strict=True)):
        da, dp = _diff(got_a, want, rule), _diff(got_p, want, rule)
        dl = _diff(plain[n], want, rule) if plain is not None else np.zeros_like(da)
        if not all(np.isfinite(d).all() for d in (da, dp, dl)):
            da = dp = dl = np.full(want.shape, np.inf)
        per_step[: len(want)] = np.maximum(per_step[: len(want)], np.maximum(np.maximum(da, dp), dl))
        worst_alone = max(worst_alone, float(da.max()))
        worst_packed = max(worst_packed, float(dp.max()))
        worst_plain = max(worst_plain, float(dl.max()))
    tolerance = TOLERANCE[precision]
    worst = max(worst_alone, worst_packed, worst_plain)
    incremental_tolerance = INCREMENTAL_TOLERANCE[precision]
    return ValidationReport(
        precision=precision,
        tolerance=tolerance,
        max_abs_diff=worst,
        max_abs_diff_alone=worst_alone,
        max_abs_diff_packed=worst_packed,
        max_abs_diff_plain=worst_plain if plain is not None else None,
        max_abs_diff_incremental=worst_incremental,
        incremental_tolerance=incremental_tolerance,
        per_step_max_abs_diff=[float(x) for x in per_step],
        num_chains=len(items),
        num_steps=int(sum(len(r) for r in reference)),
        packed_rows=packed_batch.shape[0],
        reference=reference_name,
        passed=bool(worst <= tolerance and worst_incremental <= incremental_tolerance),
    )


def _incremental_diff(
    cached_graph: tuple[Path, tuple[int, int, int]], items: Sequence[Formatted], at_once: Sequence[npt.NDArray[np.float64]]
) -> float:
    """Largest difference between scoring each chain at once (the tree graph alone) and scoring it as a search
    does, a third of its steps more per call, through the prefix cache and the cached graph."""
    path, kv_shape = cached_graph
    backend = OrtBackend(None, "cpu", cached_graph_path=path, kv_shape=kv_shape)
    cache = PrefixCache(1 << 40)
    worst = 0.0
    for item, want in zip(items, at_once, strict=True):
        n = int(item.reads.shape[0])
        cuts = sorted({max(1, n // 3), max(1, 2 * n // 3)} - {n})
        got = score_in_increments(backend, cache, item, cuts).astype(np.float64)
        d = np.abs(got - want)
        worst = max(worst, float(d.max()) if np.isfinite(d).all() else float("inf"))
    return worst


def require_pass(report: ValidationReport) -> None:
    if not report.passed:
        raise ValidationFailed(
            f"graph differs from the PyTorch reference by {report.max_abs_diff:.3g} "
            f"(alone {report.max_abs_diff_alone:.3g}, packed {report.max_abs_diff_packed:.3g}, "
            f"plain rows {report.max_abs_diff_plain if report.max_abs_diff_plain is not None else '-'}; tolerance "
            f"{report.tolerance:g} for {report.precision}), or scoring in increments through the prefix cache differs "
            f"from scoring at once by {report.max_abs_diff_incremental:.3g} (tolerance {report.incremental_tolerance:g}); "
            "per step: " + ", ".join(f"{x:.2g}" for x in report.per_step_max_abs_diff)
        )
