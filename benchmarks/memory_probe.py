"""Resident memory of the engine under a long run against a small prefix-cache budget, in a fresh process.

    python -m benchmarks.memory_probe BUNDLE [--data DIR] [--limit 192] [--passes 2] [--cache-mb 64]

Loads BUNDLE in this process (nothing else ran in it before), warms up, then runs the step-by-step workload
`--passes` times at 16 concurrent callers, and prints the process's resident memory (VmRSS) before the
engine, after its warm-up and after each pass, with glibc's view of its heap (mallinfo2: bytes in use, bytes
free but kept) and the prefix cache's own accounting. The last line is JSON (`MEMORY {...}`), for
benchmarks.cpu_suite's cache section, which runs this in a subprocess so that its earlier sections' memory
does not count.

Switches for finding where memory goes (each changes one thing): `--ort-arena off|on` (onnxruntime's CPU
memory arena), `--mem-pattern off|on`, `--no-shrink` (the engine's arena shrinking after each run off),
`--no-trim` (its malloc_trim after runs off); `--no-shrink --no-trim` is the engine before these. Run with
MALLOC_ARENA_MAX=... etc. in the environment for glibc's own tunables.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(fh.read().split(f"{field}:")[1].split()[0]) / 1024.0


def rss_split() -> str:
    return f"anon {rss_mb('RssAnon'):.0f} MB, file {rss_mb('RssFile'):.0f} MB"


def top_mappings(count: int = 8) -> str:
    """The largest mappings by resident size (/proc/self/smaps)."""
    rows: list[tuple[int, str]] = []
    name = ""
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else "[anon]"
            elif head and head[0] == "Rss:":
                rows.append((int(head[1]), name))
    rows.sort(reverse=True)
    return "; ".join(f"{kb / 1024:.0f} MB {n}" for kb, n in rows[:count])


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def heap() -> str:
    """glibc's heap, all arenas: bytes in use (uordblks), free but held (fordblks), mmapped chunks (hblkhd)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return "mallinfo2 n/a"
    fn.restype = _Mallinfo2
    m = fn()
    mb = 1 / 2**20
    return f"heap: in use {m.uordblks * mb:.0f} MB, free-held {m.fordblks * mb:.0f} MB, mmapped {m.hblkhd * mb:.0f} MB"


class Peak:
    """The highest VmRSS seen, sampled every 50 ms on a thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def take(self) -> float:
        p, self.peak = max(self.peak, rss_mb()), 0.0
        return p

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _patch_session_options(arena: str, mem_pattern: str) -> None:
    """Probe switches: every SessionOptions the backend makes gets these (onnxruntime's defaults otherwise)."""
    if arena == "default" and mem_pattern == "default":
        return
    import onnxruntime as ort

    original = ort.SessionOptions

    def options(*a: Any, **k: Any) -> Any:
        opts = original(*a, **k)
        if arena != "default":
            opts.enable_cpu_mem_arena = arena == "on"
        if mem_pattern != "default":
            opts.enable_mem_pattern = mem_pattern == "on"
        return opts

    ort.SessionOptions = options


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    from stepscore.runtime.bench import EngineSystem, closed_loop, load_workload, warm_up
    from stepscore.runtime.config import EngineConfig

    _patch_session_options(args.ort_arena, args.mem_pattern)
    from stepscore.runtime.backend import OrtBackend

    OrtBackend.shrink_cpu_arena = not args.no_shrink
    OrtBackend.trim_after_runs = not args.no_trim
    wl = load_workload("step-by-step", Path(args.data), limit=args.limit)
    peak = Peak()
    before = rss_mb()
    print(f"before engine: {before:.0f} MB ({rss_split()}); {heap()}", flush=True)
    config = EngineConfig(intra_op_threads=args.threads, cache_bytes=args.cache_mb << 20)
    system = EngineSystem(args.bundle, config=config)
    await system.setup()
    passes: list[dict[str, float]] = []
    try:
        loaded = rss_mb()
        print(f"engine loaded: {loaded:.0f} MB ({rss_split()}); {heap()}", flush=True)
        await warm_up(system, wl.requests, count=4)
        warm = rss_mb()
        print(f"after warm-up: {warm:.0f} MB ({rss_split()}, peak {peak.take():.0f}); {heap()}", flush=True)
        cache = system.engine.cache
        for n in range(args.passes):
            t0, c0 = time.perf_counter(), time.process_time()
            point = await closed_loop(system, wl.requests, args.concurrency, workload=wl.name)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            now, top = rss_mb(), peak.take()
            passes.append({"rss": now, "peak": top, "wall": wall, "cpu": cpu})
            held = cache.stats.bytes / 2**20 if cache is not None else 0.0
            text = system.engine.formatter.cache_bytes / 2**20
            print(
                f"pass {n + 1}: {len(point.records)} calls in {wall:.1f} s (CPU {cpu:.1f} s); "
                f"RSS {now:.0f} MB ({rss_split()}, peak {top:.0f}); {heap()}; "
                f"prefix cache {held:.1f} MiB, {cache.stats.evictions if cache else 0} evictions; text cache {text:.1f} MiB; "
                f"{system.engine.stats.batches} runs so far",
                flush=True,
            )
        if args.mappings:
            print("largest mappings: " + top_mappings(), flush=True)
        evictions = cache.stats.evictions if cache is not None else 0
        held = cache.stats.bytes / 2**20 if cache is not None else 0.0
    finally:
        await system.close()
        peak.stop()
    return {
        "calls": len(wl.requests),
        "passes": passes,
        "before": before,
        "loaded": loaded,
        "warm": warm,
        "end": passes[-1]["rss"] if passes else warm,
        "cache_mib": held,
        "evictions": evictions,
        "budget_mib": args.cache_mb,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--data", default=os.environ.get("STEPSCORE_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    )
    p.add_argument("--limit", type=int, default=192, help="step-by-step calls per pass")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--cache-mb", type=int, default=64)
    p.add_argument("--ort-arena", choices=("default", "on", "off"), default="default")
    p.add_argument("--mem-pattern", choices=("default", "on", "off"), default="default")
    p.add_argument("--mappings", action="store_true", help="print the largest mappings at the end")
    p.add_argument("--no-shrink", action="store_true", help="the engine's arena shrinking after runs off")
    p.add_argument("--no-trim", action="store_true", help="the engine's malloc_trim after runs off")
    args = p.parse_args()
    result = asyncio.run(probe(args))
    print("MEMORY " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
