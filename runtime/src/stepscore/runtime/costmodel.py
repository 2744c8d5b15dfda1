"""What a run of the loaded graph costs on this device, measured at start-up.

The packer decides layouts by cost (`stepscore.runtime.packing.PackOptions`): how long a shared tree row may
grow before attention over it costs more than sharing saves (`attention_cost`), when one padded row per
candidate in the plain-row graph is cheaper (`plain_cost`), and when a batch of mixed lengths should run one
length class at a time (`run_overhead`). Those three numbers are ratios of one model of a run's time,

    seconds = run + rows * S * (token + attention * S)        (S: the row length)

fitted per graph (tree, plain) by least squares over a few timed shapes. Before this, the ratios were
guesses per device class; measured, they follow the model, the threads and the machine. The fit takes well
under a second for small models and is cached in the bundle folder (`costmodel.json`, when writable), keyed by
everything that changes it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stepscore.runtime.packing import PackedBatch, PackOptions, pack
from stepscore.runtime.types import Formatted

log = logging.getLogger(__name__)

CACHE_FILE = "costmodel.json"
# (rows, row length) timed per graph: short and long rows, one and several, so that the three terms separate
SHAPES: tuple[tuple[int, int], ...] = ((1, 64), (4, 64), (1, 256), (1, 512), (2, 512), (1, 1024))
REPEATS = 3  # the fastest of these counts: other work on the machine only ever adds time
# per graph: once this much time is spent, the shapes timed so far (at least MIN_SHAPES) make the fit
BUDGET_S = 0.4
MIN_SHAPES = 4


@dataclass(frozen=True)
class RunCost:
    """seconds = run_s + tokens * (token_s + attention_s * S), tokens = rows * S."""

    run_s: float
    token_s: float
    attention_s: float

    def seconds(self, rows: int, length: int) -> float:
        return self.run_s + rows * length * (self.token_s + self.attention_s * length)


@dataclass(frozen=True)
class CostModel:
    tree: RunCost
    plain: RunCost | None

    def attention_cost(self) -> float:
        """Attention's cost per token and unit of row length relative to a token's other cost."""
        return self.tree.attention_s / self.tree.token_s

    def plain_cost(self, typical_length: int = 512) -> float | None:
        """A plain-row token's cost relative to a tree-row token, at a typical row length."""
        if self.plain is None:
            return None
        return self.plain.seconds(1, typical_length) / self.tree.seconds(1, typical_length)

    def run_overhead_tokens(self) -> float:
        return self.tree.run_s / self.tree.token_s

    def to_json(self) -> dict[str, object]:
        return {"tree": asdict(self.tree), "plain": asdict(self.plain) if self.plain else None}

    @staticmethod
    def from_json(obj: dict[str, object]) -> CostModel:
        tree, plain = obj["tree"], obj.get("plain")
        assert isinstance(tree, dict)
        return CostModel(RunCost(**tree), RunCost(**plain) if isinstance(plain, dict) else None)


def fit(samples: Sequence[tuple[int, int, float]]) -> RunCost:
    """Least-squares fit of (rows, length, seconds) samples; every term kept positive (a term the noise
    drives below zero is set to a tiny positive value, so ratios stay defined)."""
    a = np.array([[1.0, r * s, r * s * s] for r, s, _ in samples])
    y = np.array([t for _, _, t in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    tiny = 1e-12
    run, token, attention = (max(float(c), tiny) for c in coef)
    if token <= tiny:  # degenerate timings: charge every token the mean cost
        token = float(y.sum() / max(1.0, a[:, 1].sum()))
    return RunCost(run, token, attention)


def _batch(rows: int, length: int, plain: bool) -> PackedBatch:
    ids = (np.arange(length, dtype=np.int32) % 97) + 3
    # distinct first tokens: the rows share no prefix, so the packer lays out exactly `rows` rows
    items = [
        Formatted(np.concatenate(([r + 1], ids[1:])).astype(np.int32), np.array([length - 1], np.int32)) for r in range(rows)
    ]
    options = PackOptions(row_tokens=length, row_multiple=16, share_prefixes=False, pack_rows=False)
    if plain:
        options = PackOptions(row_tokens=length, row_multiple=16, plain_cost=0.0)
    return pack(items, options)


def measure(
    run: Callable[[PackedBatch], object],
    has_plain: bool,
    max_tokens: int,
    max_row: int,
    clock: Callable[[], float] = time.perf_counter,
) -> CostModel:
    """Time `run` on the shapes that fit (rows * S <= max_tokens, S <= max_row) and fit both graphs."""
    shapes = [(r, s) for r, s in SHAPES if r * s <= max_tokens and s <= max_row]
    if len(shapes) < 3:
        shapes = [(1, 16), (2, 16), (1, 32), (1, min(64, max_row))]
    models: list[RunCost] = []
    for plain in (False, True) if has_plain else (False,):
        samples: list[tuple[int, int, float]] = []
        began = clock()
        for rows, length in shapes:
            if len(samples) >= MIN_SHAPES and clock() - began > BUDGET_S:
                break
            batch = _batch(rows, length, plain)
            run(batch)  # the first run of a shape allocates
            times = []
            for _ in range(REPEATS):
                start = clock()
                run(batch)
                times.append(clock() - start)
            samples.append((rows, length, min(times)))
        models.append(fit(samples))
    return CostModel(models[0], models[1] if has_plain else None)


def cache_key(graph_sha256: str, device: str, threads: int, ort_version: str) -> dict[str, str]:
    return {
        "graph_sha256": graph_sha256,
        "device": device,
        "threads": str(threads or os.cpu_count()),
        "onnxruntime": ort_version,
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cpus",
    }


def load_cached(bundle: Path, key: dict[str, str]) -> CostModel | None:
    path = bundle / CACHE_FILE
    try:
        obj = json.loads(path.read_text())
        if obj.get("key") == key:
            return CostModel.from_json(obj["model"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        pass  # absent, unreadable or from another version: measure again
    return None


def store(bundle: Path, key: dict[str, str], model: CostModel) -> None:
    """Write the cache next to the bundle's files when the folder is writable (atomic rename)."""
    path = bundle / CACHE_FILE
    tmp = bundle / f".{CACHE_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"key": key, "model": model.to_json()}, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.debug("cost model not cached in %s: %s", bundle, exc)
