"""Sweep points -> summaries -> JSON, a markdown table and latency-throughput plots.

Rates count successful requests over the point's wall time (first send to last answer); latency
percentiles are over successful requests. Batch figures come from the system's counters over the point:

- batch fill: mean tokens computed per batch / the batch token budget (engine and server only);
- padding: the fraction of computed tokens that were padding (1 - used / computed);
- compute ratio: tokens computed / tokens submitted (below 1 when shared prefixes are computed once).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepscore.runtime.bench.drivers import PointResult


@dataclass(frozen=True)
class Summary:
    system: str
    workload: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    offered_rate: float | None  # requests/s asked for (open loop)
    requests: int  # sent
    errors: int
    wall_s: float
    requests_per_s: float
    candidates_per_s: float
    steps_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float] | None  # p50, p90, p95, p99, mean; None when nothing succeeded
    queue_ms: dict[str, float] | None  # p50, p99 of the system's own queue time
    batches: int | None
    batch_fill: float | None
    padding_fraction: float | None
    compute_ratio: float | None
    first_error: str | None = None
    cache_hit: float = 0.0  # share of the successful requests' tokens the system's prefix cache answered

    @property
    def point(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"{self.offered_rate:.3g}/s"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percentiles(values: Sequence[float], which: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": float(np.percentile(arr, q)) for q in which}
    out["mean"] = float(arr.mean())
    return out


def summarize(point: PointResult) -> Summary:
    ok = [r for r in point.records if r.ok]
    wall = point.wall_s if point.wall_s > 0 else math.inf
    queue = [r.queue_ms for r in ok if r.queue_ms is not None]
    c = point.counters
    batches = fill = padding = ratio = None
    if c is not None:
        batches = c.batches
        if c.batches > 0 and c.tokens_computed > 0:
            padding = 1.0 - c.tokens_used / c.tokens_computed
            ratio = c.tokens_computed / max(1, c.tokens_submitted)
            if point.max_batch_tokens:
                fill = c.tokens_computed / c.batches / point.max_batch_tokens
    errors = [r.error for r in point.records if r.error is not None]
    return Summary(
        system=point.system,
        workload=point.workload,
        mode=point.mode,
        concurrency=point.concurrency,
        offered_rate=point.offered_rate,
        requests=len(point.records),
        errors=len(errors),
        wall_s=point.wall_s,
        requests_per_s=len(ok) / wall,
        candidates_per_s=sum(r.candidates for r in ok) / wall,
        steps_per_s=sum(r.steps for r in ok) / wall,
        tokens_per_s=sum(r.tokens for r in ok) / wall,
        latency_ms=_percentiles([r.latency_s * 1000.0 for r in ok], (50, 90, 95, 99)) if ok else None,
        queue_ms=_percentiles(queue, (50, 99)) if queue else None,
        batches=batches,
        batch_fill=fill,
        padding_fraction=padding,
        compute_ratio=ratio,
        first_error=errors[0] if errors else None,
        cache_hit=sum(r.cached_tokens for r in ok) / max(1, sum(r.tokens for r in ok)),
    )


# --- text ----------------------------------------------------------------------------------------


def _num(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _lat(d: Mapping[str, float] | None, key: str) -> str:
    return "n/a" if d is None else f"{d[key]:.1f}"


def format_progress(s: Summary) -> str:
    """One line per sweep point, for the terminal."""
    errors = f"  {s.errors} errors ({s.first_error})" if s.errors else ""
    return (
        f"{s.system:<10} {s.workload:<14} {s.mode:<6} {s.point:<9} {s.requests:5d} req "
        f"{s.requests_per_s:8.2f} req/s {s.candidates_per_s:9.1f} cand/s {s.tokens_per_s:10.0f} tok/s  "
        f"p50 {_lat(s.latency_ms, 'p50')} p99 {_lat(s.latency_ms, 'p99')} ms  "
        f"queue p50 {_lat(s.queue_ms, 'p50')} ms  fill {_pct(s.batch_fill)} pad {_pct(s.padding_fraction)} "
        f"cached {_pct(s.cache_hit)}{errors}"
    )


COLUMNS = (
    "system",
    "workload",
    "loop",
    "point",
    "requests",
    "errors",
    "req/s",
    "cand/s",
    "steps/s",
    "tok/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "queue p50 ms",
    "queue p99 ms",
    "batches",
    "batch fill",
    "padding",
    "computed/submitted",
    "from cache",
)


def markdown_table(summaries: Sequence[Summary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for s in summaries:
        cells = [
            s.system,
            s.workload,
            s.mode,
            s.point,
            str(s.requests),
            str(s.errors),
            f"{s.requests_per_s:.2f}",
            f"{s.candidates_per_s:.1f}",
            f"{s.steps_per_s:.1f}",
            f"{s.tokens_per_s:.0f}",
            _lat(s.latency_ms, "p50"),
            _lat(s.latency_ms, "p90"),
            _lat(s.latency_ms, "p99"),
            _lat(s.queue_ms, "p50"),
            _lat(s.queue_ms, "p99"),
            "n/a" if s.batches is None else str(s.batches),
            _pct(s.batch_fill),
            _pct(s.padding_fraction),
            _num(s.compute_ratio, ".2f"),
            _pct(s.cache_hit),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- files ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    plots: list[Path]
    note: str  # what was not written, and why ("" when everything was)


def write_report(
    summaries: Sequence[Summary], out_dir: str | os.PathLike[str], meta: Mapping[str, Any] | None = None
) -> ReportFiles:
    """Write results.json, results.md and one latency_<workload>.png per workload (when matplotlib is
    installed; without it, everything else is written and `note` says so)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    json_path = out / "results.json"
    json_path.write_text(json.dumps({"meta": meta, "points": [s.to_json() for s in summaries]}, indent=1), encoding="utf-8")
    partial = list(meta.get("partial", []))
    plots, note = plot_latency(summaries, out, partial=bool(partial))
    md_path = out / "results.md"
    md = ["# stepscore bench" + (" (PARTIAL RUN)" if partial else ""), ""]
    if partial:
        # a partial run's figures must never read as a complete result
        md += ["**Partial run**: these parts were not measured, so the tables and plots below are incomplete:", ""]
        md += [f"- {line}" for line in partial] + [""]
    for key in ("command", "started", "machine", "gpus", "model", "device"):
        if key in meta:
            md.append(f"- {key}: {meta[key]}")
    for name, description in meta.get("systems", {}).items():
        md.append(f"- system {name}: {description}")
    for w in meta.get("workloads", []):
        shape = f"{w['requests']} requests, {w['candidates']} candidates, {w['steps']} steps"
        md.append(f"- workload {w['name']}: {shape} ({w['source']})")
    md += [
        "",
        "Rates count successful requests over the point's wall time; latency from send (open loop: scheduled arrival) "
        "to answer. Batch fill = tokens computed per batch / the batch budget; padding = padded share of computed tokens; "
        "computed/submitted < 1 where shared prefixes were computed once. From cache = share of the tokens the "
        "prefix cache answered (each point starts with an empty cache). n/a: the system does not report it.",
        "",
        markdown_table(summaries),
    ]
    md += [f"![latency {p.stem}]({p.name})" for p in plots]
    if note:
        md.append(f"\n{note}")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return ReportFiles(json_path, md_path, plots, note)


def plot_latency(summaries: Sequence[Summary], out: Path, partial: bool = False) -> tuple[list[Path], str]:
    """latency_<workload>.png: p50 and p99 against requests/s, one line per system and loop (titled as a
    partial run's when `partial`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "PNG plots not written: matplotlib is not installed (pip install 'stepscore[bench]')."
    paths = []
    for workload in dict.fromkeys(s.workload for s in summaries):
        points = [s for s in summaries if s.workload == workload and s.latency_ms is not None]
        if not points:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        systems = list(dict.fromkeys(s.system for s in points))
        for key, ax in zip(("p50", "p99"), axes, strict=True):
            for system, mode in dict.fromkeys((s.system, s.mode) for s in points):
                line = sorted((s for s in points if s.system == system and s.mode == mode), key=lambda s: s.requests_per_s)
                xs = [s.requests_per_s for s in line]
                ys = [s.latency_ms[key] for s in line if s.latency_ms is not None]
                # one colour per system; the closed loop solid, the open loop dashed
                style = "-o" if mode == "closed" else "--s"
                color = f"C{systems.index(system) % 10}"
                ax.plot(xs, ys, style, color=color, label=f"{system} ({mode} loop)", markersize=4)
            ax.set_title(f"{workload}: latency {key}" + (" (PARTIAL RUN)" if partial else ""))
            ax.set_xlabel("throughput (requests/s)")
            ax.set_ylabel(f"{key} latency (ms)")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"latency_{workload}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths, ""
