"""`stepscore bench`: latency and throughput on real search traffic, against the baselines, in one run.

    stepscore bench --bundle B --workload bon16,beam,processbench --concurrency 1,4,16,64
    stepscore bench --bundle B --serve --hf-model M --rate-fractions 0.5,0.9
    stepscore bench --target host:50051 --metrics-url http://host:9090/metrics --workload beam

Systems, one after the other on the same machine (so they never compete for it): the engine in this
process, a gRPC server (--target, or --serve to start one), the naive onnxruntime loop and, with
--hf-model, Hugging Face PyTorch eager. Each runs the closed loop over --concurrency, then the open loop
over --rates (or --rate-fractions of its own closed-loop maximum). One line per sweep point while it
runs; results.json, results.md and latency_<workload>.png in --out at the end.

The engine flags below apply to the engine, to the server --serve starts and, where they mean something,
to the baselines (--device; --threads also sets PyTorch's thread count, so every system gets the same
cores; --max-batch-tokens caps the naive loop's batches). On a shared or small machine, pass --threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stepscore.errors import ConfigError
from stepscore.runtime.bench.drivers import PointResult, sweep, warm_up
from stepscore.runtime.bench.report import Summary, format_progress, summarize, write_report
from stepscore.runtime.bench.systems import EngineSystem, HfEagerSystem, NaiveOrtSystem, ServiceSystem, System
from stepscore.runtime.bench.workloads import WORKLOADS, Workload, default_data_dir, load_workload
from stepscore.runtime.flags import add_engine_args, bundle_path, engine_config, engine_devices, env_default
from stepscore.version import __version__

SYSTEMS = ("engine", "service", "naive-ort", "hf-eager")


def _ints(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",") if x.strip()]


def _floats(raw: str) -> list[float]:
    return [float(x) for x in raw.split(",") if x.strip()]


def _names(raw: str) -> list[str]:
    return [x.strip() for x in raw.split(",") if x.strip()]


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="benchmark latency and throughput on real search traffic, against baselines",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
    )
    g = p.add_argument_group("what to drive")
    g.add_argument("--bundle", default=None, help="bundle directory (default: the embedded model, unless --target is given)")
    g.add_argument("--target", default="", help="a running `stepscore serve` at HOST:PORT")
    g.add_argument("--metrics-url", default="", help="the server's Prometheus endpoint (batch fill and padding for --target)")
    g.add_argument("--token", default=env_default("token", "", str), help="bearer token for --target (prefer STEPSCORE_TOKEN)")
    g.add_argument("--serve", action="store_true", help="start `stepscore serve BUNDLE --port 0` and benchmark it too")
    g.add_argument(
        "--hf-model", default="", help="HF model folder the bundle was exported from: adds the PyTorch eager baseline"
    )
    g.add_argument("--hf-batch-size", type=int, default=8, help="padded batch size of the PyTorch baseline (default 8)")
    g.add_argument(
        "--hf-dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="PyTorch baseline precision (default: the bundle's on CUDA, fp32 on CPU)",
    )
    g.add_argument(
        "--systems", default="", help=f"subset of {','.join(SYSTEMS)} (default: every one the other flags make possible)"
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload",
        default="",
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default: bon16,beam,processbench when the "
        "data is there, else synthetic,synthetic-beam)",
    )
    w.add_argument("--data", default="", help="the shared data folder (default: $STEPSCORE_DATA or ../shared/data)")
    w.add_argument("--limit", type=int, default=100, help="requests per workload (default 100)")
    w.add_argument("--aggregates", default="min", help="aggregates every request asks for (default min)")
    w.add_argument("--truncate-left", action="store_true", help="requests ask for left truncation of over-long candidates")
    w.add_argument("--synthetic-scale", type=float, default=1.0, help="step-length factor of synthetic workloads (default 1)")
    w.add_argument("--seed", type=int, default=0, help="seed of synthetic workloads, stand-in steps and arrivals")
    s = p.add_argument_group("sweep")
    s.add_argument("--concurrency", default="1,4,16,64", help="closed-loop concurrencies ('' for none; default 1,4,16,64)")
    s.add_argument("--rates", default="", help="open-loop request rates, requests/s (e.g. 5,10,20)")
    s.add_argument(
        "--rate-fractions",
        default="0.25,0.5,0.75,0.9",
        help="open-loop rates as fractions of each system's closed-loop maximum, used when --rates is not "
        "given ('' for none; default 0.25,0.5,0.75,0.9)",
    )
    s.add_argument("--open-requests", type=int, default=0, help="requests per open-loop point (default: the workload's)")
    s.add_argument("--open-duration", type=float, default=0.0, help="seconds per open-loop point (instead of a count)")
    s.add_argument("--warmup", type=int, default=8, help="unmeasured requests per system and workload (default 8)")
    s.add_argument("--out", default="", help="output folder (default: stepscore-bench-<date-time>)")
    s.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    add_engine_args(p)
    p.set_defaults(run=run_bench)


# --- plan ----------------------------------------------------------------------------------------


def serve_args(args: argparse.Namespace) -> list[str]:
    """The engine flags of this command, for the server it starts: both then run the same engine."""
    out = [
        "--device", args.device,
        "--max-batch-tokens", str(args.max_batch_tokens),
        "--max-wait-ms", str(args.max_wait_ms),
        "--row-tokens", str(args.row_tokens),
        "--max-queued-requests", str(args.max_queued_requests),
        "--max-queued-tokens", str(args.max_queued_tokens),
        "--max-seq-len", str(args.max_seq_len),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if args.devices:
        out += ["--devices", str(args.devices)]
    for flag in ("no_prefix_sharing", "no_packing", "no_verify"):
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    return out


def plan_systems(args: argparse.Namespace) -> list[Callable[[], System]]:
    """Factories of the systems to run, in order (each is built, run and closed before the next)."""
    bundle = Path(args.bundle) if args.bundle else (None if args.target else bundle_path(None))
    wanted = set(_names(args.systems)) if args.systems else None
    if wanted is not None and wanted - set(SYSTEMS):
        raise ConfigError(f"--systems: unknown {sorted(wanted - set(SYSTEMS))}; known: {', '.join(SYSTEMS)}")
    if args.serve and args.target:
        raise ConfigError("--serve starts its own server: do not also pass --target")
    if args.metrics_url and not args.target:
        raise ConfigError("--metrics-url is for a server given by --target (--serve scrapes its own)")
    if (args.serve or args.hf_model) and bundle is None:
        raise ConfigError("--serve and --hf-model need --bundle")

    def want(name: str, possible: bool, why: str) -> bool:
        if wanted is None:
            return possible
        if name in wanted and not possible:
            raise ConfigError(f"--systems {name}: {why}")
        return name in wanted

    config = engine_config(args)
    factories: list[Callable[[], System]] = []

    def need_bundle() -> Path:
        assert bundle is not None  # checked above for every system that reads it
        return bundle

    if want("engine", bundle is not None, "needs --bundle"):
        factories.append(lambda: EngineSystem(need_bundle(), args.device, config, engine_devices(args)))
    if want("service", bool(args.target or args.serve), "needs --target or --serve"):
        if args.serve:
            factories.append(lambda: ServiceSystem.spawn(need_bundle(), serve_args(args), args.token or None))
        else:
            factories.append(lambda: ServiceSystem(args.target, args.metrics_url or None, args.token or None))
    if want("naive-ort", bundle is not None, "needs --bundle"):
        factories.append(lambda: NaiveOrtSystem(need_bundle(), args.device, args.threads, args.max_batch_tokens))
    if want("hf-eager", bool(args.hf_model), "needs --hf-model"):
        factories.append(
            lambda: HfEagerSystem(args.hf_model, need_bundle(), args.device, args.hf_batch_size, args.hf_dtype, args.threads)
        )
    if not factories:
        raise ConfigError("nothing to benchmark: give --bundle, --target or --serve")
    return factories


def plan_workloads(args: argparse.Namespace) -> list[Workload]:
    data = Path(args.data) if args.data else default_data_dir()
    names = _names(args.workload)
    if not names:
        names = ["bon16", "beam", "processbench"] if (data / "search_traces_sal").is_dir() else ["synthetic", "synthetic-beam"]
    return [
        load_workload(
            name,
            data,
            args.limit or None,
            seed=args.seed,
            aggregates=tuple(_names(args.aggregates)),
            truncate_left=args.truncate_left,
            synthetic_scale=args.synthetic_scale,
        )
        for name in names
    ]


def _meta(args: argparse.Namespace, workloads: Sequence[Workload], argv: Sequence[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "command": "stepscore bench " + " ".join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "device": args.device,
        "stepscore_version": __version__,
        "workloads": [w.describe() for w in workloads],
        "sweep": {
            "concurrency": _ints(args.concurrency),
            "rates": _floats(args.rates),
            "rate_fractions": [] if args.rates else _floats(args.rate_fractions),
            "open_requests": args.open_requests or None,
            "open_duration": args.open_duration or None,
            "warmup": args.warmup,
            "seed": args.seed,
        },
    }
    bundle = args.bundle or (None if args.target else str(bundle_path(None)))
    if bundle:
        from stepscore.runtime.bundle import load_bundle

        m = load_bundle(bundle, verify=False).manifest
        meta["model"] = (
            f"{m.source.get('model', bundle)} ({m.family}, {m.preset}, {m.graph.precision}, "
            f"{m.model.num_parameters:,} parameters)"
        )
        meta["bundle"] = str(bundle)
    try:
        import onnxruntime

        meta["onnxruntime_version"] = onnxruntime.__version__
    except ImportError:
        pass
    if str(args.device).startswith("cuda") or args.devices:
        meta["gpus"] = _gpu_names()
    return meta


def _gpu_names() -> str:
    """The GPUs as nvidia-smi names them ("" where it cannot say): results are only comparable on one card."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "; ".join(line.strip() for line in out.splitlines() if line.strip())


# --- run -----------------------------------------------------------------------------------------


async def run_systems(
    factories: Sequence[Callable[[], System]],
    workloads: Sequence[Workload],
    args: argparse.Namespace,
    progress: Callable[[str], None],
    described: dict[str, str] | None = None,
) -> list[Summary]:
    """Each system in turn: set up, warm up and sweep every workload, close. `described` receives each
    system's description."""
    summaries: list[Summary] = []

    def on_point(point: PointResult) -> None:
        summary = summarize(point)
        summaries.append(summary)
        progress(format_progress(summary))

    for make in factories:
        system = make()
        progress(f"-- {system.name}: starting")
        started = time.perf_counter()
        try:
            await system.setup()
            progress(f"-- {system.name}: ready in {time.perf_counter() - started:.1f}s: {system.description}")
            if described is not None:
                described[system.name] = system.description
            for workload in workloads:
                await warm_up(system, workload.requests, args.warmup)
                await sweep(
                    system,
                    workload.requests,
                    workload=workload.name,
                    concurrency=_ints(args.concurrency),
                    rates=_floats(args.rates),
                    rate_fractions=_floats(args.rate_fractions),
                    open_count=args.open_requests or None,
                    open_duration=args.open_duration or None,
                    seed=args.seed,
                    progress=on_point,
                )
        finally:
            await system.close()
    return summaries


def run_bench(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    factories = plan_systems(args)
    workloads = plan_workloads(args)
    for w in workloads:
        d = w.describe()
        say(f"workload {w.name}: {d['requests']} requests, {d['candidates']} candidates, {d['steps']} steps ({w.source})")
    meta = _meta(args, workloads, sys.argv[2:] if argv is None else argv)
    meta["systems"] = {}
    summaries = asyncio.run(run_systems(factories, workloads, args, say, meta["systems"]))
    out = Path(args.out) if args.out else Path(time.strftime("stepscore-bench-%Y%m%d-%H%M%S"))
    files = write_report(summaries, out, meta)
    say(f"wrote {files.json}, {files.markdown}" + "".join(f", {p}" for p in files.plots))
    if files.note:
        say(files.note)
    return 0
