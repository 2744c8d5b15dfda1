"""`stepscore bench`: the benchmark harness, usable from the command line and from Python.

    from stepscore.runtime.bench import EngineSystem, closed_loop, load_workload, summarize, write_report

    workload = load_workload("beam", "../shared/data", limit=200)
    system = EngineSystem("bundle/")
    await system.setup()
    points = [await closed_loop(system, workload.requests, c, workload="beam") for c in (1, 4, 16)]
    await system.close()
    write_report([summarize(p) for p in points], "out/")

- `workloads`: requests shaped like real client traffic (Best-of-N, beam search, ProcessBench), from the
  shared traces, or synthetic with the same length distributions;
- `systems`: what is driven, behind one small `System` interface (the engine in-process, a gRPC server,
  a naive onnxruntime loop, Hugging Face PyTorch eager);
- `drivers`: closed loop (fixed concurrency), open loop (Poisson arrivals at a fixed rate), sweeps;
- `report`: summaries, JSON, a markdown table, latency-throughput plots;
- `cli`: `stepscore bench`.
"""

from __future__ import annotations

from stepscore.runtime.bench.drivers import PointResult, RequestRecord, closed_loop, open_loop, poisson_arrivals, sweep, warm_up
from stepscore.runtime.bench.report import ReportFiles, Summary, markdown_table, summarize, write_report
from stepscore.runtime.bench.systems import (
    BatchCounters,
    EngineSystem,
    HfEagerSystem,
    LocalServer,
    NaiveOrtSystem,
    ServiceSystem,
    System,
)
from stepscore.runtime.bench.workloads import WORKLOADS, Workload, load_workload, processbench_best_of_n_workload

__all__ = [
    "WORKLOADS",
    "BatchCounters",
    "EngineSystem",
    "HfEagerSystem",
    "LocalServer",
    "NaiveOrtSystem",
    "PointResult",
    "ReportFiles",
    "RequestRecord",
    "ServiceSystem",
    "Summary",
    "System",
    "Workload",
    "closed_loop",
    "load_workload",
    "markdown_table",
    "open_loop",
    "poisson_arrivals",
    "processbench_best_of_n_workload",
    "summarize",
    "sweep",
    "warm_up",
    "write_report",
]
