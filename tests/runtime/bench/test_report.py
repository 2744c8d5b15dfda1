"""Report: summaries from sweep points; JSON and markdown always, PNG plots when matplotlib is there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from stepscore.runtime.bench.drivers import PointResult, RequestRecord
from stepscore.runtime.bench.report import format_progress, markdown_table, summarize, write_report
from stepscore.runtime.bench.systems import BatchCounters


def _point(system: str = "engine", mode: str = "closed", scale: float = 1.0, counters: bool = True) -> PointResult:
    records = [
        RequestRecord(i, 0.0, scale * (i + 1) / 1000.0, candidates=4, steps=10, tokens=400, queue_ms=float(i))
        for i in range(100)
    ]
    records.append(RequestRecord(100, 0.0, 0.5, 4, 10, 0, error="Overloaded: queue full"))
    return PointResult(
        system,
        "bon16",
        "closed" if mode == "closed" else "open",
        4 if mode == "closed" else None,
        None if mode == "closed" else 20.0,
        wall_s=2.0,
        records=records,
        counters=BatchCounters(10, 40_000, 30_000, 32_000) if counters else None,
        max_batch_tokens=16_000 if counters else None,
    )


def test_summarize() -> None:
    s = summarize(_point())
    assert s.requests == 101 and s.errors == 1 and s.first_error == "Overloaded: queue full"
    assert s.requests_per_s == 50.0 and s.candidates_per_s == 200.0 and s.steps_per_s == 500.0 and s.tokens_per_s == 20_000
    assert (
        s.latency_ms is not None and s.latency_ms["p50"] == pytest.approx(50.5) and s.latency_ms["p99"] == pytest.approx(99.01)
    )
    assert s.queue_ms is not None and s.queue_ms["p50"] == pytest.approx(49.5)
    assert s.batches == 10 and s.batch_fill == pytest.approx(0.2) and s.padding_fraction == pytest.approx(2_000 / 32_000)
    assert s.compute_ratio == pytest.approx(0.8)
    bare = summarize(_point(counters=False))
    assert bare.batches is None and bare.batch_fill is None and bare.padding_fraction is None
    assert "n/a" in format_progress(bare) and "c=4" in format_progress(s)
    assert "| engine | bon16 | closed | c=4 | 101 | 1 |" in markdown_table([s])


def test_write_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summaries = [summarize(_point("engine", m, k)) for m in ("closed", "open") for k in (1.0, 2.0)]
    summaries.append(summarize(_point("naive-ort", "closed", 3.0, counters=False)))
    files = write_report(summaries, tmp_path / "out", {"command": "stepscore bench", "workloads": []})
    data = json.loads(files.json.read_text())
    assert data["meta"]["command"] == "stepscore bench" and len(data["points"]) == 5
    assert data["points"][0]["latency_ms"]["p99"] == pytest.approx(99.01)
    md = files.markdown.read_text()
    assert "| system | workload |" in md and "naive-ort" in md and "latency_bon16.png" in md
    assert files.plots == [tmp_path / "out" / "latency_bon16.png"] and files.plots[0].stat().st_size > 1000
    assert files.note == ""


def test_write_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    files = write_report([summarize(_point())], tmp_path)
    assert files.json.is_file() and files.markdown.is_file() and files.plots == []
    assert "matplotlib is not installed" in files.note and files.note in files.markdown.read_text()
    assert not list(tmp_path.glob("*.png"))
