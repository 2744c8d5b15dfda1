"""CPU benchmarks of the runtime, on the real search traces, written into benchmarks/RESULTS.md.

    python -m benchmarks.cpu_suite runtime     # engine (c = 1..64, cost model on/off) vs ORT one at a time vs eager
    python -m benchmarks.cpu_suite sharing     # prefix sharing on vs off (beam search, DVTS)
    python -m benchmarks.cpu_suite grpc        # gRPC service vs the engine in-process
    python -m benchmarks.cpu_suite plain       # plain-row graph (GroupQueryAttention) vs tree graph
    python -m benchmarks.cpu_suite cache       # prefix cache off / within-call sharing only / on
    python -m benchmarks.cpu_suite nice        # compute threads lowered (--compute-nice 10) vs not
    python -m benchmarks.cpu_suite allocator   # the server on glibc vs jemalloc: throughput and RSS
    python -m benchmarks.cpu_suite all

The model is a small Qwen2-shaped PRM with random weights (speed does not depend on what a model learned)
and the real Qwen2.5-Math-PRM tokenizer from ../shared/tokenizers, exported to fp32 (faster than fp16 on a
CPU) into benchmarks/.cache/. Traces are read from ../shared/data ($STEPSCORE_SHARED names another shared
folder). Each section replaces its block in
RESULTS.md, with the hardware, the commit and the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# the shared data and tokenizers: $STEPSCORE_SHARED, else ../shared beside the repository
SHARED = Path(os.environ.get("STEPSCORE_SHARED") or ROOT.parent / "shared")

# 8 layers, hidden 384: a 71M-parameter PRM (58M of it the 151k-token embedding table, 13M the body).
SHAPE = dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
             intermediate_size=1024)  # fmt: skip


def log(msg: str) -> None:
    print(msg, flush=True)


def build_model() -> tuple[Path, Path]:
    """The benchmark PRM: HF folder (random weights, real tokenizer) and its fp32 bundle, cached."""
    folder, bundle = CACHE / "bench-prm", CACHE / "bench-prm-fp32"
    from benchmarks.models import bundle_is_current

    if bundle_is_current(bundle):
        return folder, bundle
    tok = SHARED / "tokenizers" / "qwen2.5-math-prm"
    if not (folder / "model.safetensors").is_file() and not tok.is_dir():
        raise SystemExit(f"{tok} is missing: the CPU suite needs the real Qwen tokenizer and traces in ../shared")
    from benchmarks.models import write_random_prm

    # fp32 weights (the bundle is fp32: faster on a CPU); the real tokenizer and its chat template
    write_random_prm(folder, {"vocab_size": 151936, **SHAPE}, dtype="float32", tokenizer=tok, system_prompt=None)
    from stepscore.export.pipeline import export_model

    export_model(str(folder), bundle, precision="fp32", force=True, progress=lambda line: log("  " + line))
    return folder, bundle


def environment() -> str:
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", out)
        cores = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
        cpu = f"{model.group(1).strip() if model else cpu}, {cores.group(1) if cores else '?'} cores"
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # benchmark outputs (this file's sections, stepscore bench's reports) do not make the measured code dirty
    status = ["git", "status", "--porcelain", "--", ".", ":!benchmarks/RESULTS.md", ":!benchmarks/cpu-bench"]
    dirty = subprocess.run(status, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import onnxruntime
    import torch

    return (
        f"{time.strftime('%Y-%m-%d')}, commit {commit}{' + uncommitted changes' if dirty else ''}, {cpu}, "
        f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    )


def write_section(name: str, body: str) -> None:
    """Replace the block between <!-- name --> markers in RESULTS.md (append it if absent)."""
    body = body.replace(str(SHARED), "../shared")
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    log(f"wrote section {name} of {RESULTS}")


async def measure(
    system: Any, requests: Sequence[Any], concurrency: int, workload: str, before_close: Callable[[Any], None] | None = None
) -> Any:
    """One closed-loop point; `before_close(system)` runs after it, while a server the system started still runs."""
    from stepscore.runtime.bench import closed_loop, summarize, warm_up

    await system.setup()
    try:
        await warm_up(system, requests, count=min(4, len(requests)), concurrency=min(concurrency, 4))
        point = await closed_loop(system, requests, concurrency, workload=workload)
        if before_close is not None:
            before_close(system)
    finally:
        await system.close()
    s = summarize(point)
    p50 = (s.latency_ms or {}).get("p50", float("nan"))
    pad = s.padding_fraction if s.padding_fraction is not None else float("nan")
    ratio = s.compute_ratio if s.compute_ratio is not None else float("nan")
    log(
        f"  {s.system:<18} c={concurrency:<3} {s.tokens_per_s:9,.0f} tok/s  {s.requests_per_s:7.2f} req/s  "
        f"p50 {p50:8.1f} ms  padding {pad:.3f}  computed/submitted {ratio:.3f}  errors {s.errors}"
    )
    return s


def cmd_line() -> str:
    return "python -m benchmarks.cpu_suite " + " ".join(sys.argv[1:])


# --- sections --------------------------------------------------------------------------------------


CONCURRENCY = (1, 4, 16, 64)
# N = 16 requests per point in the runtime section (N = 3: 8x as many, and every point at least one per
# caller); on 2 idle cores the whole section takes about 20 minutes, most of it the N = 16 engine at c = 64
# (64 requests of ~10,000 tokens, twice: with and without the cost model)
RUNTIME_REQUESTS = 8


@dataclass(frozen=True)
class Measured:
    """One closed-loop point: its summary and its 95th latency percentile (ms)."""

    summary: Any  # stepscore.runtime.bench.Summary
    p95_ms: float
    runs: tuple[float, ...] = ()  # tokens/s of every repeat of the point (the summary is the median one's)

    @property
    def tokens_per_s(self) -> float:
        return float(self.summary.tokens_per_s)


async def measure_sweep(
    system: Any, requests: Sequence[Any], points: Sequence[tuple[int, int]], workload: str, repeats: int = 1
) -> list[Measured]:
    """One system set up once, warmed up by a few unmeasured requests, then a closed loop per (concurrency,
    number of requests) point, in order, the prefix cache emptied before each. With `repeats`, the whole
    sweep runs that many times (so that a disturbance hits one repeat of several points, not every repeat of
    one) and each point reports its median repeat."""
    import numpy as np

    from stepscore.runtime.bench import closed_loop, summarize, warm_up

    await system.setup()
    out: list[list[Measured]] = [[] for _ in points]
    try:
        first = points[0]
        await warm_up(system, requests, count=min(2, len(requests), first[1]), concurrency=min(first[0], 2))
        for _, (index, (concurrency, count)) in itertools.product(range(repeats), enumerate(points)):
            await system.forget()  # every point sends the same requests: the cache would answer from the last
            point = await closed_loop(system, requests, concurrency, count=count, workload=workload)
            s = summarize(point)
            ok = [r.latency_s * 1000.0 for r in point.records if r.ok]
            p95 = float(np.percentile(ok, 95)) if ok else float("nan")
            p50 = (s.latency_ms or {}).get("p50", float("nan"))
            pad = s.padding_fraction if s.padding_fraction is not None else float("nan")
            log(
                f"  {s.system:<18} c={concurrency:<3} n={count:<4} {s.tokens_per_s:9,.0f} tok/s  "
                f"{s.requests_per_s:7.2f} req/s  p50 {p50:8.1f} ms  p95 {p95:8.1f} ms  padding {pad:.3f}  "
                f"wall {s.wall_s:6.1f} s  errors {s.errors}"
            )
            if s.errors:
                log(f"    first error: {s.first_error}")
            out[index].append(Measured(s, p95))
    finally:
        await system.close()
    medians = []
    for repeated in out:
        ranked = sorted(repeated, key=lambda m: m.tokens_per_s)
        middle = ranked[(len(ranked) - 1) // 2]
        medians.append(Measured(middle.summary, middle.p95_ms, tuple(m.tokens_per_s for m in repeated)))
    return medians


def _runtime_row(label: str, m: Measured, a: Measured, b: Measured, bold: bool = False) -> str:
    s, mark = m.summary, "**" if bold else ""
    p50 = (s.latency_ms or {}).get("p50", float("nan"))
    pad = f"{s.padding_fraction:.1%}" if s.padding_fraction is not None else "n/a"
    spread = f" ({min(m.runs):,.0f}-{max(m.runs):,.0f})" if len(m.runs) > 1 else ""
    return (
        f"| {label} | {s.tokens_per_s:,.0f}{spread} | {p50:,.0f} ms | {m.p95_ms:,.0f} ms | {pad} | "
        f"{mark}{m.tokens_per_s / a.tokens_per_s:.2f}x{mark} | {mark}{m.tokens_per_s / b.tokens_per_s:.2f}x{mark} |"
    )


def _verdict(cost: str, engine: Sequence[tuple[int, Measured]], a: Measured, b: Measured) -> str:
    """Whether tokens/s never drops as concurrency grows, and the lowest ratios to the baselines."""
    drops = [
        f"c={c0} {m0.tokens_per_s:,.0f} -> c={c1} {m1.tokens_per_s:,.0f}"
        for (c0, m0), (c1, m1) in itertools.pairwise(engine)
        if m1.tokens_per_s < m0.tokens_per_s
    ]
    ra = min(m.tokens_per_s / a.tokens_per_s for _, m in engine)
    rb = min(m.tokens_per_s / b.tokens_per_s for _, m in engine)
    return (
        f"- engine, {cost}: tokens/s non-decreasing with concurrency: "
        f"{'yes' if not drops else 'no (' + '; '.join(drops) + ')'}; lowest ratio over concurrencies "
        f"{ra:.2f}x vs (a) ({'meets' if ra >= 1.6 else 'misses'} 1.6x), {rb:.2f}x vs (b) "
        f"({'meets' if rb >= 2.0 else 'misses'} 2x)"
    )


async def runtime_section(args: argparse.Namespace) -> None:
    """Best-of-N N = 3 (ProcessBench solutions) and N = 16 (search-and-learn traces): (a) one request at a
    time through onnxruntime, (b) PyTorch eager padded batches of 8, and the engine at concurrency 1, 4, 16
    and 64, with the start-up cost model and without."""
    from stepscore.runtime.bench import EngineSystem, HfEagerSystem, NaiveOrtSystem, load_workload
    from stepscore.runtime.bench.workloads import processbench_best_of_n_workload
    from stepscore.runtime.config import EngineConfig

    folder, bundle = build_model()
    formatter = _formatter(bundle)
    # requests per point: `base` for the baselines and the engine, at least one per caller (c = 64 sends
    # 64 requests at once). An N = 3 request is ~8x smaller than an N = 16 one (~1,200 vs ~10,000 tokens):
    # 8x as many.
    runs = []
    for n, scale in ((3, 8), (16, 1)):
        base = (args.requests or RUNTIME_REQUESTS) * scale
        counts = {c: max(base, c) for c in args.concurrency}
        if n == 3:
            wl = processbench_best_of_n_workload(SHARED / "data", formatter, limit=max(counts.values()))
        else:
            wl = load_workload("bon16", SHARED / "data", limit=max(counts.values()))
        log(
            f"runtime: Best-of-N N={n}, {len(wl.requests)} requests "
            f"({sum(len(r.candidates) for r in wl.requests)} candidates), requests per point {counts}"
        )
        naive = NaiveOrtSystem(bundle, threads=args.threads)
        (a,) = await measure_sweep(naive, wl.requests, [(1, base)], wl.name, args.repeats)
        hf = HfEagerSystem(folder, bundle, batch_size=8, dtype="fp32", threads=args.threads)
        (b,) = await measure_sweep(hf, wl.requests, [(1, base)], wl.name, args.repeats)
        engine = {}
        for cost in (True, False):
            config = EngineConfig(intra_op_threads=args.threads, measure_cost=cost)
            name = "engine" if cost else "engine-nocost"
            points = [(c, counts[c]) for c in args.concurrency]
            engine[cost] = list(
                zip(
                    args.concurrency,
                    await measure_sweep(
                        EngineSystem(bundle, config=config, name=name), wl.requests, points, wl.name, args.repeats
                    ),
                    strict=True,
                )
            )
        runs.append((n, wl, base, counts, a, b, engine))

    tables = []
    repeated = (
        f" Every point measured {args.repeats} times (each system's whole sweep again): tokens/s is the median"
        " repeat, (lowest-highest) after it; latencies and ratios are the median repeat's."
        if args.repeats > 1
        else ""
    )
    for n, wl, base, counts, a, b, engine in runs:
        what = (
            f"{n} unrelated ProcessBench solutions of 300-600 formatted tokens each, as token ids"
            if n == 3
            else f"{n} completions of one MATH problem (search-and-learn traces)"
        )
        rows = [
            _runtime_row("(a) onnxruntime, one request at a time, padded", a, a, b),
            _runtime_row("(b) PyTorch eager, padded batches of 8", b, a, b),
        ]
        for cost, label in ((True, "cost model"), (False, "no cost model")):
            rows += [_runtime_row(f"engine, c={c}, {label}", mm, a, b, bold=True) for c, mm in engine[cost]]
        tables.append(f"""### Best-of-N, N = {n}

{len(wl.requests)} requests of {what} (`{wl.source}`); requests per point: {base} for the baselines
(one caller), {", ".join(f"{counts[c]} for the engine at c={c}" for c in args.concurrency)}.{repeated}

| system | tokens/s | p50 latency | p95 latency | padding | vs (a) | vs (b) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{_verdict("cost model", engine[True], a, b)}
{_verdict("no cost model", engine[False], a, b)}
""")
    body = f"""## Runtime: engine vs one request at a time vs PyTorch eager (CPU)

{environment()}. Command: `{cmd_line()}`.
Model: Qwen2-shaped PRM, random weights, {SHAPE["num_hidden_layers"]} layers x hidden {SHAPE["hidden_size"]}
(13M body + 58M embedding parameters), real Qwen2.5-Math-PRM tokenizer, fp32. Baselines: (a) the same ONNX
graph through onnxruntime, one request at a time, its candidates padded into one batch; (b) PyTorch eager,
padded batches of 8 (search-and-learn's PRM wrappers). Both take one request at a time, so they run with one
caller. The engine runs in-process with `concurrency` closed-loop callers, with the cost model measured at
start-up (the default) and without it (`measure_cost=False`, `--no-cost-model`: the default ratios).

{chr(10).join(tables)}
tokens/s counts the candidates' formatted tokens (what a client submits), the same for every system;
latency is per request, queueing included (with c callers, about c requests are in flight). Targets: the
engine >= 1.6x (a) and >= 2x (b) at every concurrency, for both N; tokens/s non-decreasing with concurrency.
"""
    write_section("runtime", body)


async def nice_section(args: argparse.Namespace) -> None:
    """What `--compute-nice 10` costs the model's throughput on a machine where nothing else wants the cores:
    the engine in-process at 16 callers on Best-of-N N = 16, niceness 0 and 10 alternating, `--repeats`
    times each (the median reported with the range)."""
    from stepscore.runtime.bench import EngineSystem, load_workload
    from stepscore.runtime.config import EngineConfig

    _, bundle = build_model()
    count = (args.requests or RUNTIME_REQUESTS) * 2
    wl = load_workload("bon16", SHARED / "data", limit=count)
    log(f"nice: Best-of-N N=16, {len(wl.requests)} requests at 16 callers, {args.repeats} repeat(s)")
    runs: dict[int, list[float]] = {0: [], 10: []}
    for _, nice in itertools.product(range(args.repeats), (0, 10)):
        system = EngineSystem(bundle, config=EngineConfig(intra_op_threads=args.threads, compute_nice=nice))
        (m,) = await measure_sweep(system, wl.requests, [(16, count)], wl.name)
        runs[nice].append(m.tokens_per_s)

    def cell(xs: list[float]) -> str:
        return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"

    ratio = statistics.median(runs[10]) / statistics.median(runs[0])
    body = f"""## Compute threads lowered (`--compute-nice 10`) vs not, on an idle machine (CPU)

{environment()}. Command: `{cmd_line()}`. The engine in-process at 16 callers, {count} Best-of-N N = 16
requests (the search-and-learn traces) per run; niceness 0 and 10 alternate, each run from a fresh engine;
tokens/s medians of {args.repeats} runs with their range.

| compute threads | tokens/s | vs niceness 0 |
|---|---|---|
| niceness 0 (default) | {cell(runs[0])} | 1.00x |
| niceness 10 | {cell(runs[10])} | {ratio:.2f}x |

Lowering decides who goes first when several threads want a core. Here the benchmark's own callers (their
event loop, at niceness 0, shares the 2 cores) go first, which is what a server's event loop gets too: what
that buys is in docs/reliability.md (refusals under overload), and the ratio is what it costs.
"""
    write_section("nice", body)


async def allocator_section(args: argparse.Namespace) -> None:
    """What the server's allocator does to throughput and memory: `stepscore serve --allocator glibc` and
    `--allocator jemalloc` alternating, Best-of-N N = 16 at 64 callers over gRPC, `--repeats` times each; tokens/s
    and the server's peak and final RSS per run (medians with their range)."""
    from stepscore.runtime import allocator
    from stepscore.runtime.bench import ServiceSystem, load_workload

    if allocator.find_jemalloc() is None:
        log("allocator: jemalloc is not installed here (apt-get install libjemalloc2): nothing to compare, skipped")
        return
    _, bundle = build_model()
    count = (args.requests or RUNTIME_REQUESTS) * 2
    wl = load_workload("bon16", SHARED / "data", limit=count)
    serve_args = ["--threads", str(args.threads)] if args.threads else []
    log(f"allocator: Best-of-N N=16, {len(wl.requests)} requests at 64 callers over gRPC, {args.repeats} repeat(s)")
    runs: dict[str, list[tuple[float, float, float]]] = {"glibc": [], "jemalloc": []}
    memory: list[float] = []  # the last run's server: VmHWM, VmRSS (MB)

    def read_memory(system: Any) -> None:
        status = Path(f"/proc/{system.server.pid}/status").read_text()
        memory[:] = [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith(("VmHWM", "VmRSS"))]

    for _, name in itertools.product(range(args.repeats), runs):
        m = await measure(
            ServiceSystem.spawn(bundle, [*serve_args, "--allocator", name]), wl.requests, 64, wl.name, read_memory
        )
        peak, rss = memory  # /proc lists VmHWM before VmRSS
        runs[name].append((m.tokens_per_s, peak, rss))

    def cell(xs: list[float], fmt: str = ",.0f") -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    rows = []
    base = statistics.median(t for t, _, _ in runs["glibc"])
    for name, label in (
        ("glibc", "glibc, mmap threshold 128 KiB (`--allocator glibc`)"),
        ("jemalloc", "jemalloc (default where installed)"),
    ):
        tps, peaks, ends = ([r[i] for r in runs[name]] for i in range(3))
        rows.append(f"| {label} | {cell(tps)} | {statistics.median(tps) / base:.2f}x | {cell(peaks)} MB | {cell(ends)} MB |")
    body = f"""## The server's allocator: glibc vs jemalloc (CPU)

{environment()}. Command: `{cmd_line()}`. A separate `stepscore serve` process per run, on loopback, the
benchmark's client at 64 callers, {count} Best-of-N N = 16 requests (the search-and-learn traces) per run after
a warm-up; the two allocators alternate; medians of {args.repeats} runs with their range. RSS is the server's
(/proc/PID/status, read as the run ends: VmHWM, the peak, and VmRSS); most of it is the prefix cache at its
default budget (an eighth of the memory available at start-up, ~2.9 GB here).

| server's malloc | tokens/s | vs glibc | peak RSS | RSS at the end |
|---|---|---|---|---|
{chr(10).join(rows)}

Why jemalloc is the default: in 30-minute soaks its RSS stays flat, where glibc's creeps up (docs/reliability.md,
"The allocator"); this table is what that costs in throughput. `--allocator glibc` trades the flat memory
back for it.
"""
    write_section("allocator", body)


async def sharing_section(args: argparse.Namespace) -> None:
    from stepscore.runtime.bench import EngineSystem, load_workload
    from stepscore.runtime.config import EngineConfig

    _, bundle = build_model()
    rows = []
    for name in ("beam", "dvts"):
        wl = load_workload(name, SHARED / "data", limit=(args.requests or 24) * 3)
        log(f"sharing: {name}, {len(wl.requests)} requests")
        on = await measure(EngineSystem(bundle, config=EngineConfig(intra_op_threads=args.threads)), wl.requests, 16, name)
        off = await measure(
            EngineSystem(bundle, config=EngineConfig(intra_op_threads=args.threads, share_prefixes=False)),
            wl.requests,
            16,
            name,
        )
        rows.append((name, len(wl.requests), on, off))
    lines = "\n".join(
        f"| {name} | {n} | {off.compute_ratio:.3f} | {on.compute_ratio:.3f} | {off.tokens_per_s:,.0f} | "
        f"{on.tokens_per_s:,.0f} | **{on.tokens_per_s / off.tokens_per_s:.2f}x** |"
        for name, n, on, off in rows
    )
    body = f"""## Shared prefixes: sharing on vs off (CPU)

{environment()}. Command: `{cmd_line()}`. Same model as above; the engine at 16 concurrent callers.
Workloads rebuilt from the search-and-learn beam-search traces (16 candidates per call, whole prefix + new
step at every iteration; see `stepscore.runtime.bench.workloads`).

| workload | requests | tokens computed / submitted, off | ... on | tokens/s off | tokens/s on | speed-up |
|---|---|---|---|---|---|---|
{lines}

"Tokens computed" counts rows x row length (padding included); "submitted" the candidates' tokens.
Target: >= 2.5x on the beam workload.
"""
    write_section("sharing", body)


async def paired_latency(
    a: Any, b: Any, requests: Sequence[Any], pause_s: float = 0.05
) -> tuple[list[float], list[float], int]:
    """Each request through `a` and through `b`, one after the other, alternating which goes first: slow
    drifts of the machine (other processes, clock) hit both alike. A pause after each call lets the idle
    system's onnxruntime threads stop spinning before the other one runs. Returns both latency lists (s)
    and the tokens of one pass."""
    await a.setup()
    await b.setup()
    try:
        for r in requests[:4]:  # warm-up
            await a.score(r)
            await b.score(r)
        la: list[float] = []
        lb: list[float] = []
        tokens = 0
        for i, r in enumerate(requests):
            for system, into in ((a, la), (b, lb)) if i % 2 == 0 else ((b, lb), (a, la)):
                await asyncio.sleep(pause_s)
                t = time.perf_counter()
                result = await system.score(r)
                into.append(time.perf_counter() - t)
            tokens += sum(c.num_tokens for c in result.candidates)
    finally:
        await a.close()
        await b.close()
    return la, lb, tokens


async def grpc_section(args: argparse.Namespace) -> None:
    """Latency at concurrency 1 on small requests (one ProcessBench solution each: the overhead is not lost
    in the compute time), measured in pairs; throughput at saturation on Best-of-N requests (64 callers)."""
    import statistics

    from stepscore.runtime.bench import EngineSystem, ServiceSystem, load_workload
    from stepscore.runtime.config import EngineConfig

    _, bundle = build_model()
    serve_args = ["--threads", str(args.threads)] if args.threads else []
    config = EngineConfig(intra_op_threads=args.threads)
    wl = load_workload("processbench", SHARED / "data", limit=(args.requests or 24) * 4)
    log(f"grpc: processbench, {len(wl.requests)} requests, concurrency 1, paired")
    le, ls, tokens = await paired_latency(
        EngineSystem(bundle, config=config), ServiceSystem.spawn(bundle, serve_args), wl.requests
    )
    p50e, p50s = statistics.median(le), statistics.median(ls)
    paired = statistics.median(y - x for x, y in zip(le, ls, strict=True))
    log(f"  in-process p50 {p50e * 1e3:.1f} ms, gRPC p50 {p50s * 1e3:.1f} ms, median paired difference {paired * 1e3:+.1f} ms")
    lines = [
        f"| processbench ({len(wl.requests)} requests, paired) | 1 | {tokens / sum(le):,.0f} | {tokens / sum(ls):,.0f} | "
        f"{1 - sum(le) / sum(ls):+.1%} | {p50e * 1e3:.1f} ms | {p50s * 1e3:.1f} ms | {(p50s - p50e) * 1e3:+.1f} ms "
        f"(paired: {paired * 1e3:+.1f} ms) |"
    ]
    wl = load_workload("bon16", SHARED / "data", limit=(args.requests or 24))
    log(f"grpc: bon16, {len(wl.requests)} requests, concurrency 64")
    e = await measure(EngineSystem(bundle, config=config), wl.requests, 64, "bon16")
    s = await measure(ServiceSystem.spawn(bundle, serve_args), wl.requests, 64, "bon16")
    lines.append(
        f"| bon16 ({len(wl.requests)} requests) | 64 | {e.tokens_per_s:,.0f} | {s.tokens_per_s:,.0f} | "
        f"{1 - s.tokens_per_s / e.tokens_per_s:+.1%} | - | - | - |"
    )
    body = f"""## gRPC overhead: the service vs the engine in-process (CPU)

{environment()}. Command: `{cmd_line()}`. Same model. The server is a separate `stepscore serve` process on
loopback (sharing the 2 cores with the client), the client `stepscore.runtime.client.AsyncClient` (unary
Score). Latency is measured at concurrency 1 on one-solution requests, each sent through both in turn
(alternating which goes first, 50 ms apart), so that the machine's drifts hit both alike; "paired" is the
median of the per-request differences. Throughput is measured at saturation on Best-of-N requests (the p50
there would be the whole run's length: every request is in flight at once).

| workload | concurrency | in-process tokens/s | gRPC tokens/s | throughput lost | in-process p50 | gRPC p50 | added p50 |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Targets: <= 15% lower throughput and <= 2 ms added p50.
"""
    write_section("grpc", body)


async def plain_section(args: argparse.Namespace) -> None:
    """The plain-row graph against the tree graph: the same padded batches through both, then the engine on
    Best-of-N traffic with plain rows never and always."""
    import dataclasses

    import numpy as np

    from stepscore.runtime.backend import OrtBackend
    from stepscore.runtime.bench import EngineSystem, load_workload
    from stepscore.runtime.config import EngineConfig
    from stepscore.runtime.packing import PackOptions, pack
    from stepscore.runtime.types import Formatted

    _, bundle = build_model()
    backend = OrtBackend(bundle / "model.onnx", threads=args.threads or None, plain_graph_path=bundle / "model_plain.onnx")
    rng = np.random.default_rng(0)
    graph_rows = []
    for b, s in ((32, 128), (8, 512), (4, 1024)):
        reads = np.linspace(s // 8 - 1, s - 1, 8).astype(np.int32)
        items = [Formatted(rng.integers(10, 150000, s).astype(np.int32), reads) for _ in range(b)]
        plain = pack(items, PackOptions(row_tokens=s, row_multiple=1, plain_cost=0.0))
        tree = dataclasses.replace(plain, seq_lens=None)
        times = {}
        for name, batch in (("tree", tree), ("plain", plain)):
            backend.run(batch)
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                backend.run(batch)
                runs.append(time.perf_counter() - t)
            times[name] = sorted(runs)[2]
        diff = float(np.abs(backend.run(tree) - backend.run(plain)).max())
        graph_rows.append((b, s, times["tree"], times["plain"], diff))
        log(f"plain: {b}x{s} tree {times['tree'] * 1e3:.0f} ms, plain {times['plain'] * 1e3:.0f} ms, |d| {diff:.1e}")
    wl = load_workload("bon16", SHARED / "data", limit=(args.requests or 24))
    engine_rows = []
    for mode in ("never", "auto", "always"):
        config = EngineConfig(intra_op_threads=args.threads, plain_rows=mode)
        engine_rows.append((mode, await measure(EngineSystem(bundle, config=config), wl.requests, 64, "bon16")))
    graph_lines = "\n".join(
        f"| {b}x{s} | {b * s / t:,.0f} | {b * s / p:,.0f} | {t / p:.2f} | {d:.1e} |" for b, s, t, p, d in graph_rows
    )
    engine_lines = "\n".join(
        f"| {mode} | {r.tokens_per_s:,.0f} | {r.compute_ratio or 0.0:.3f} | {r.padding_fraction or 0.0:.3f} |"
        for mode, r in engine_rows
    )
    body = f"""## Plain-row graph vs tree graph (CPU)

{environment()}. Command: `{cmd_line()}`. Same model. The plain-row graph (`stepscore.export.plain`) runs
GroupQueryAttention without an attention bias; on CUDA that is the flash-attention path, which this CPU run
cannot show. Median of 5 runs of the same padded batch (random tokens, 8 reads per row) through each graph:

| B x S | tree graph tokens/s | plain graph tokens/s | plain / tree | max abs diff |
|---|---|---|---|---|
{graph_lines}

The engine on Best-of-N traffic (bon16, {len(wl.requests)} requests, 64 callers): `--plain-rows never` (tree
rows: shared prefixes, packing), `auto` (per batch, the cheaper layout by the cost model, with the CPU's
plain-token cost of 0.9 taken from the table above) and `always` (one padded row per candidate through the
plain graph):

| plain rows | tokens/s | tokens computed / submitted | padding |
|---|---|---|---|
{engine_lines}

Without flash kernels on the CPU, the plain graph's gain is the bias add and the K/V head repeat it does
not do; packing and sharing matter more on this traffic. The CUDA default plain-token cost (0.75) is an
expectation, to be replaced by the GPU script's figure (benchmarks/gpu/NOTES.md).
"""
    write_section("plain", body)


CACHE_MB = 1024  # the prefix cache's budget in the cache section: every workload here fits


async def measure_cold(system: Any, requests: Sequence[Any], concurrency: int, workload: str) -> Any:
    """`measure`, with the prefix cache emptied after the warm-up: the measured calls find only what the
    measured calls before them left."""
    from stepscore.runtime.bench import closed_loop, summarize, warm_up

    await system.setup()
    try:
        await warm_up(system, requests, count=min(4, len(requests)), concurrency=min(concurrency, 4))
        await system.forget()
        cache = system.engine.cache
        point = await closed_loop(system, requests, concurrency, workload=workload)
        hits = (cache.stats.hit_tokens, cache.stats.miss_tokens) if cache is not None else None
    finally:
        await system.close()
    s = summarize(point)
    lat = s.latency_ms or {}
    log(
        f"  {system.name:<12} {workload:<13} c={concurrency:<3} {s.tokens_per_s:9,.0f} tok/s  p50 {lat.get('p50', 0):7.1f} ms"
        f"  p95 {lat.get('p95', 0):7.1f} ms  errors {s.errors}" + (f"  cache hit/miss tokens {hits}" if hits else "")
    )
    return s, hits


async def cache_section(args: argparse.Namespace) -> None:
    """The prefix cache on the workloads as search clients send them: off (no reuse at all), within-call
    sharing only (the default before the cache), and cache on (with sharing)."""
    from stepscore.runtime.bench import EngineSystem, load_workload
    from stepscore.runtime.config import EngineConfig

    _, bundle = build_model()
    concurrency = 16
    modes = {
        "off": dict(cache_bytes=0, share_prefixes=False),
        "sharing": dict(cache_bytes=0),
        "cache": dict(cache_bytes=CACHE_MB << 20),
    }
    n = args.requests or 24
    limits = {"step-by-step": n * 8, "beam": n * 2, "dvts": n * 2, "bon16": n}
    rows: list[str] = []
    verdicts: list[str] = []
    ceilings: list[str] = []
    formatter = _formatter(bundle)
    for name, limit in limits.items():
        wl = load_workload(name, SHARED / "data", limit=limit)
        submitted, unique, new = reuse_ceiling([formatter.format_request(r) for r in wl.requests])
        ceilings.append(f"| {name} | {submitted:,} | {unique:,} | {new:,} | {submitted / new:.2f}x | {unique / new:.2f}x |")
        got: dict[str, Any] = {}
        for mode, extra in modes.items():
            config = EngineConfig(intra_op_threads=args.threads, **extra)  # type: ignore[arg-type]
            got[mode] = await measure_cold(EngineSystem(bundle, config=config, name=mode), wl.requests, concurrency, name)
        base = got["off"][0].tokens_per_s
        for mode, (s, hits) in got.items():
            lat = s.latency_ms or {}
            hit = f"{hits[0] / max(1, hits[0] + hits[1]):.0%}" if hits else "-"
            rows.append(
                f"| {name} | {len(wl.requests)} | {mode} | {s.tokens_per_s:,.0f} | {lat.get('p50', 0):.0f} ms | "
                f"{lat.get('p95', 0):.0f} ms | {hit} | {s.tokens_per_s / base:.2f}x | "
                f"{s.tokens_per_s / got['sharing'][0].tokens_per_s:.2f}x |"
            )
        cache_vs_off = got["cache"][0].tokens_per_s / base
        cache_vs_sharing = got["cache"][0].tokens_per_s / got["sharing"][0].tokens_per_s
        verdicts.append(f"{name}: cache on / off {cache_vs_off:.2f}x, cache on / sharing only {cache_vs_sharing:.2f}x")
    table = "\n".join(rows)
    memory = await _cache_memory(bundle, args)
    body = f"""## Prefix cache: cache off, within-call sharing only, cache on (CPU)

{environment()}. Command: `{cmd_line()}`. Same model as above; the engine in-process at {concurrency} concurrent
callers; cache budget {CACHE_MB} MiB. Each measurement starts with an empty cache (emptied after the warm-up).
Workloads (`stepscore.runtime.bench.workloads`): `step-by-step` scores ProcessBench solutions as they are written
(steps[:1], steps[:2], ...; one candidate per call), `beam` and `dvts` are rebuilt from the search-and-learn
beam-search traces (16 candidates, whole prefix + new step per call), `bon16` is Best-of-N N = 16 (no reuse across
calls: the control). Calls carry their search's id, as the bench's clients send it.

| workload | requests | mode | tokens/s | p50 | p95 | tokens from the cache | vs off | vs sharing only |
|---|---|---|---|---|---|---|---|---|
{table}

{"; ".join(verdicts)}.
"off" is cache off and within-call sharing off; "sharing" the engine's default before the cache (shared prefixes
inside a call computed once); "cache" the prefix cache on top of sharing. tokens/s counts submitted tokens.
Targets: step-by-step >= 4x vs off; beam >= 2x vs sharing only; Best-of-N >= 0.95x.

What each mode has to compute at best, counted on the same calls' formatted token ids
(`benchmarks.cpu_suite.reuse_ceiling`): "sharing" computes each distinct step prefix of a call once, "cache"
each distinct step prefix of the whole run once (an unbounded cache). Their ratios bound the speed-ups above,
but for two things: attention makes a token of a longer row dearer (time ratios differ a little), and the
packer lays out a call's shared prefix once only where a tree row is cheaper than separate rows (Best-of-N's
problem under long unrelated solutions is not: "sharing" recomputes it per candidate, the cache does not):

| workload | submitted | distinct per call | distinct per run | off / cache, at best | sharing / cache, at best |
|---|---|---|---|---|---|
{chr(10).join(ceilings)}

{memory}
"""
    write_section("cache", body)


def reuse_ceiling(calls: Sequence[Sequence[Any]]) -> tuple[int, int, int]:
    """For calls of formatted candidates (stepscore.runtime.types.Formatted), in order: the tokens submitted,
    the tokens left when each call computes each distinct step prefix once (within-call sharing at best), and
    those left when the whole run does (a prefix cache that never evicts)."""
    seen_run: dict[tuple[int, bytes], int] = {}  # (parent node, segment ids) -> node, over the run
    submitted = unique = new = 0
    for call in calls:
        seen_call: set[int] = set()
        for item in call:
            submitted += item.num_tokens
            node, start = 0, 0
            ends = [int(r) + 1 for r in item.reads]
            if not ends or ends[-1] < item.num_tokens:
                ends.append(item.num_tokens)  # tokens after the last read: a segment of their own
            for end in ends:
                key = (node, item.ids[start:end].tobytes())
                known = key in seen_run
                node = seen_run.setdefault(key, len(seen_run) + 1)
                if node not in seen_call:
                    seen_call.add(node)
                    unique += end - start
                if not known:
                    new += end - start
                start = end
    return submitted, unique, new


def _formatter(bundle: Path) -> Any:
    from stepscore.runtime.bundle import load_bundle
    from stepscore.runtime.formatting import Formatter

    loaded = load_bundle(bundle)
    m = loaded.manifest
    return Formatter(m.format, loaded.tokenizer_path, m.model.vocab_size, m.model.max_seq_len)


async def _cache_memory(bundle: Path, args: argparse.Namespace) -> str:
    """A long run against a small budget: the step-by-step workload three times over, evicting all along, in a
    fresh process (benchmarks.memory_probe), so that this process's earlier sections do not count: resident
    memory before the engine starts, after its warm-up and at the end. Then the same traffic with the cache
    off, once: the memory the model itself takes to serve it (the target is the model's plus the budget's)."""
    budget_mb, passes = 64, 3
    on = await _memory_probe(bundle, args, budget_mb, passes)
    off = await _memory_probe(bundle, args, 0, 1)
    before, warm, end = on["before"], on["warm"], on["end"]
    peak = max(p["peak"] for p in on["passes"])
    off_end, off_peak = off["end"], max(p["peak"] for p in off["passes"])
    allowed = (off_end + budget_mb) * 1.1  # the probe reports MiB (VmRSS kB / 1024)
    calls = passes * on["calls"]
    return (
        f"Memory under a long run (the step-by-step workload {passes} times, {calls} calls, cache budget "
        f"{budget_mb} MiB, the engine alone in a fresh process: `python -m benchmarks.memory_probe`): resident memory "
        f"{before:,.0f} MB before the engine, {warm:,.0f} MB after its warm-up (model loaded), {end:,.0f} MB at the "
        f"end (peak {peak:,.0f} MB) with the cache holding {on['cache_mib']:.1f} MiB after {on['evictions']:,} evictions: "
        f"growth after warm-up {end - warm:,.0f} MB for a {budget_mb} MiB budget. The same traffic with the cache off "
        f"(`--cache-mb 0`, one pass: the model serving it, its working memory included): {off_end:,.0f} MB at the end, "
        f"peak {off_peak:,.0f} MB. Target, the model's + the budget + 10%: {allowed:,.0f} MB; cache on ends at "
        f"{end:,.0f} MB ({'within' if end <= allowed else 'over'})."
    )


async def _memory_probe(bundle: Path, args: argparse.Namespace, budget_mb: int, passes: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory_probe", str(bundle), "--data", str(SHARED / "data")]
    cmd += ["--limit", str((args.requests or 24) * 8), "--passes", str(passes), "--cache-mb", str(budget_mb)]
    cmd += ["--threads", str(args.threads)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    lines = out.decode().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("MEMORY "):
        raise SystemExit(f"memory probe failed (exit {proc.returncode}): {' '.join(cmd)}")
    for line in lines[:-1]:
        log("  " + line)
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("MEMORY "))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=("runtime", "sharing", "grpc", "plain", "cache", "nice", "allocator", "all"))
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help=f"Best-of-N requests (default 24; runtime: N = 16 requests per point, default {RUNTIME_REQUESTS}, "
        "at least one per caller, 8x as many for N = 3; beam/DVTS: 3x as many iterations)",
    )
    p.add_argument(
        "--concurrency",
        type=lambda text: sorted({int(c) for c in text.split(",")}),
        default=list(CONCURRENCY),
        help="runtime: the engine's concurrencies, comma-separated (default 1,4,16,64; fewer for a smoke run)",
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime / torch threads (0: their default)")
    p.add_argument("--repeats", type=int, default=1, help="runtime: measure every point this many times and report the median")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sections = (
        ("runtime", runtime_section),
        ("sharing", sharing_section),
        ("grpc", grpc_section),
        ("plain", plain_section),
        ("cache", cache_section),
        ("nice", nice_section),
        ("allocator", allocator_section),
    )
    for name, fn in sections:
        if args.section in (name, "all"):
            asyncio.run(fn(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
