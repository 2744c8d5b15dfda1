"""`stepscore bench`: latency and throughput on real search traffic, against the baselines, in one run.

    stepscore bench                                   the embedded model on its own arithmetic traffic
    stepscore bench B --data ../shared/data --workload bon16,beam,processbench --concurrency 1,4,16,64
    stepscore bench B --serve --hf-model M --rate-fractions 0.5,0.9
    stepscore bench --target host:50051 --metrics-url http://host:9090/metrics --workload beam

Systems, one after the other on the same machine (so they never compete for it): the engine in this
process, a gRPC server (--target, or --serve to start one), the naive onnxruntime loop and, with
--hf-model, Hugging Face PyTorch eager. Each runs the closed loop over --concurrency, then the open loop
over --rates (or --rate-fractions of its own closed-loop maximum). One line per sweep point while it
runs; results.json, results.md and latency_<workload>.png in --out at the end.

Workloads by default: the embedded model's own arithmetic traffic (arith, arith-beam) when BUNDLE is not
given; otherwise the real search traces (bon16, beam, processbench) when --data or STEPSCORE_DATA names
the folder that holds them, else synthetic traffic of the same shape. A run where a system or a workload
could not be measured (an error, Ctrl-C) still writes its report, labelled partial, and exits non-zero.

The engine flags below apply to the engine, to the server --serve starts and, where they mean something,
to the baselines (--device; --threads also sets PyTorch's thread count, so every system gets the same
cores; --max-batch-tokens caps the naive loop's batches). On a shared or small machine, pass --threads.
Flags that only mean something here read STEPSCORE_BENCH_<FLAG>.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepscore.errors import ConfigError, StepscoreError
from stepscore.runtime.bench.drivers import PointResult, sweep, warm_up
from stepscore.runtime.bench.report import Summary, format_progress, summarize, write_report
from stepscore.runtime.bench.systems import EngineSystem, HfEagerSystem, NaiveOrtSystem, ServiceSystem, System
from stepscore.runtime.bench.workloads import DATA_ENV, WORKLOADS, Workload, default_data_dir, load_workload
from stepscore.runtime.flags import (
    add_bundle_arg,
    add_engine_args,
    add_flag,
    add_switch,
    bundle_path,
    engine_config,
    engine_devices,
)
from stepscore.version import __version__

SYSTEMS = ("engine", "service", "naive-ort", "hf-eager")
SCOPE = "bench"  # STEPSCORE_BENCH_<FLAG> for the flags that only mean something here


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
    add_bundle_arg(p)
    # the flag form of BUNDLE from earlier versions, kept so that recorded commands still run
    p.add_argument("--bundle", dest="bundle_flag", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("what to drive")
    add_flag(
        g,
        "--target",
        "",
        str,
        "a running `stepscore serve` at HOST:PORT (instead of BUNDLE); several replicas as A,B,C (or ipv4:A,B / "
        "dns:///NAME:PORT): runs with search affinity (ring_hash) and with round_robin, and reports the calls per "
        "replica and the prefix-cache hit rate of each",
        scope=SCOPE,
    )
    add_flag(g, "--metrics-url", "", str, "the server's Prometheus endpoint (batch fill and padding for --target)", scope=SCOPE)
    add_flag(g, "--token", "", str, "bearer token for --target (prefer the environment variable)")
    add_switch(g, "--serve", "start `stepscore serve BUNDLE --port 0` and benchmark it too", scope=SCOPE)
    add_flag(g, "--hf-model", "", str, "HF model folder BUNDLE was exported from: adds the PyTorch eager baseline", scope=SCOPE)
    add_flag(g, "--hf-batch-size", 8, int, "padded batch size of the PyTorch baseline", scope=SCOPE)
    add_flag(
        g,
        "--hf-dtype",
        "auto",
        str,
        "PyTorch baseline precision (auto: the bundle's on CUDA, fp32 on CPU)",
        choices=("auto", "fp32", "fp16", "bf16"),
        scope=SCOPE,
    )
    add_flag(
        g,
        "--systems",
        "",
        str,
        f"subset of {','.join(SYSTEMS)}",
        shown="every one the other flags make possible",
        scope=SCOPE,
    )
    w = p.add_argument_group("workload")
    add_flag(
        w,
        "--workload",
        "",
        str,
        f"comma-separated, of {', '.join(WORKLOADS)}",
        shown="arith,arith-beam for the embedded model; bon16,beam,processbench with --data; else synthetic,synthetic-beam",
        scope=SCOPE,
    )
    add_flag(
        w,
        "--data",
        "",
        str,
        "the folder holding the real traces (search_traces_sal/, processbench/): the shared data folder",
        shown=f"${DATA_ENV}; none",
        scope=SCOPE,
    )
    add_flag(w, "--limit", 100, int, "requests per workload", scope=SCOPE)
    add_flag(w, "--aggregates", "min", str, "aggregates every request asks for", scope=SCOPE)
    add_switch(w, "--truncate-left", "requests ask for left truncation of over-long candidates", scope=SCOPE)
    add_flag(w, "--synthetic-scale", 1.0, float, "step-length factor of synthetic workloads", scope=SCOPE)
    add_flag(w, "--seed", 0, int, "seed of generated workloads, stand-in steps and arrivals", scope=SCOPE)
    s = p.add_argument_group("sweep")
    add_flag(s, "--concurrency", "1,4,16,64", str, "closed-loop concurrencies ('' for none)", scope=SCOPE)
    add_flag(s, "--rates", "", str, "open-loop request rates, requests/s (e.g. 5,10,20)", scope=SCOPE)
    add_flag(
        s,
        "--rate-fractions",
        "0.25,0.5,0.75,0.9",
        str,
        "open-loop rates as fractions of each system's closed-loop maximum, used when --rates is not given ('' for none)",
        scope=SCOPE,
    )
    add_flag(s, "--open-requests", 0, int, "requests per open-loop point", shown="the workload's", scope=SCOPE)
    add_flag(s, "--open-duration", 0.0, float, "seconds per open-loop point (instead of a count)", shown="off", scope=SCOPE)
    add_flag(s, "--warmup", 8, int, "unmeasured requests per system and workload", scope=SCOPE)
    add_flag(s, "--out", "", str, "output folder", shown="stepscore-bench-<date-time>", scope=SCOPE)
    add_flag(s, "--log-level", "warning", str, "logging level", choices=("debug", "info", "warning", "error"))
    add_engine_args(p)
    p.set_defaults(run=run_bench)


def given_bundle(args: argparse.Namespace) -> str | None:
    """BUNDLE as given (positionally or by the old --bundle flag); None for the embedded model or --target."""
    if args.bundle and args.bundle_flag and args.bundle != args.bundle_flag:
        raise ConfigError(f"two bundles given: {args.bundle} and --bundle {args.bundle_flag}")
    return str(args.bundle or args.bundle_flag) if (args.bundle or args.bundle_flag) else None


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


def several_replicas(target: str) -> bool:
    """Whether a --target names several servers: A,B,C (HOST:PORT each) or a gRPC target that may resolve to
    several (ipv4:A,B / dns:///name:port)."""
    from stepscore.runtime.client import names_several

    return bool(target) and names_several(client_target(target))


def client_target(target: str) -> str:
    """A --target of several HOST:PORT as the gRPC target the client balances over (ipv4: needs IP addresses)."""
    if target.startswith(("ipv4:", "ipv6:", "dns:")) or "," not in target:
        return target
    return "ipv4:" + target


def plan_systems(args: argparse.Namespace) -> list[Callable[[], System]]:
    """Factories of the systems to run, in order (each is built, run and closed before the next)."""
    given = given_bundle(args)
    bundle = Path(given) if given else (None if args.target else bundle_path(None))
    if bundle is not None:
        from stepscore.runtime.bundle import load_bundle

        load_bundle(bundle, verify=False)  # a wrong BUNDLE is said before any workload is built
    wanted = set(_names(args.systems)) if args.systems else None
    if wanted is not None and wanted - set(SYSTEMS):
        raise ConfigError(f"--systems: unknown {sorted(wanted - set(SYSTEMS))}; known: {', '.join(SYSTEMS)}")
    if args.serve and args.target:
        raise ConfigError("--serve starts its own server: do not also pass --target")
    if args.metrics_url and not args.target:
        raise ConfigError("--metrics-url is for a server given by --target (--serve scrapes its own)")
    if args.metrics_url and several_replicas(args.target):
        raise ConfigError("--metrics-url names one server's metrics: not for a --target naming several replicas")
    if (args.serve or args.hf_model) and bundle is None:
        raise ConfigError("--serve and --hf-model need BUNDLE (a --target server's bundle is not known here)")

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

    if want("engine", bundle is not None, "needs BUNDLE"):
        factories.append(lambda: EngineSystem(need_bundle(), args.device, config, engine_devices(args)))
    if want("service", bool(args.target or args.serve), "needs --target or --serve"):
        if args.serve:
            factories.append(lambda: ServiceSystem.spawn(need_bundle(), serve_args(args), args.token or None))
        elif several_replicas(args.target):
            # several replicas: the same traffic with search affinity (ring_hash), then round_robin
            target, token = client_target(args.target), args.token or None

            def replicas(affinity: bool, name: str) -> Callable[[], System]:
                return lambda: ServiceSystem(target, None, token, name=name, affinity=affinity)

            factories += [replicas(True, "service-affinity"), replicas(False, "service-round-robin")]
        else:
            factories.append(lambda: ServiceSystem(args.target, args.metrics_url or None, args.token or None))
    if want("naive-ort", bundle is not None, "needs BUNDLE"):
        factories.append(lambda: NaiveOrtSystem(need_bundle(), args.device, args.threads, args.max_batch_tokens))
    if want("hf-eager", bool(args.hf_model), "needs --hf-model"):
        factories.append(
            lambda: HfEagerSystem(args.hf_model, need_bundle(), args.device, args.hf_batch_size, args.hf_dtype, args.threads)
        )
    if not factories:
        raise ConfigError("nothing to benchmark: give BUNDLE, --target or --serve")
    return factories


def default_workloads(args: argparse.Namespace, data: Path | None) -> list[str]:
    """What to run when --workload is not given: traffic the model can score (see the module docstring)."""
    if given_bundle(args) is None and not args.target:
        return ["arith", "arith-beam"]  # the embedded model knows only its arithmetic format (512 tokens)
    if data is not None and (data / "search_traces_sal").is_dir():
        return ["bon16", "beam", "processbench"]
    return ["synthetic", "synthetic-beam"]


def plan_workloads(args: argparse.Namespace) -> list[Workload]:
    data = Path(args.data) if args.data else default_data_dir()
    names = _names(args.workload) or default_workloads(args, data)
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
    bundle = given_bundle(args) or (None if args.target else str(bundle_path(None)))
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


@dataclass
class Outcome:
    """What a run measured, and what it could not: a run with any `missing` entry is partial."""

    summaries: list[Summary] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # one line per system, workload or point not measured
    described: dict[str, str] = field(default_factory=dict)  # each system's description


def _all_failed(summary: Summary) -> str | None:
    if summary.requests and summary.errors == summary.requests:
        return f"{summary.system} on {summary.workload} at {summary.point}: every request failed ({summary.first_error})"
    return None


async def run_systems(
    factories: Sequence[Callable[[], System]],
    workloads: Sequence[Workload],
    args: argparse.Namespace,
    progress: Callable[[str], None],
    outcome: Outcome | None = None,
) -> Outcome:
    """Each system in turn: set up, warm up and sweep every workload, close. A system that cannot start, or
    a workload it cannot finish, is recorded in `outcome.missing` and the run goes on with the next."""
    outcome = outcome if outcome is not None else Outcome()

    def on_point(point: PointResult) -> None:
        summary = summarize(point)
        outcome.summaries.append(summary)
        failed = _all_failed(summary)
        if failed:
            outcome.missing.append(failed)
        progress(format_progress(summary))

    for make in factories:
        system: System | None = None
        started = time.perf_counter()
        try:
            system = make()
            progress(f"-- {system.name}: starting")
            await system.setup()
        except (StepscoreError, OSError) as exc:
            name = system.name if system is not None else "a system"
            outcome.missing.append(f"{name}: could not start ({exc})")
            progress(f"-- {name}: could not start: {exc}")
            if system is not None:
                await system.close()
            continue
        try:
            progress(f"-- {system.name}: ready in {time.perf_counter() - started:.1f}s: {system.description}")
            outcome.described[system.name] = system.description
            for workload in workloads:
                try:
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
                except (StepscoreError, OSError) as exc:
                    outcome.missing.append(f"{system.name} on {workload.name}: {exc}")
                    progress(f"-- {system.name} on {workload.name}: stopped: {exc}")
            routing = system.routing() if isinstance(system, ServiceSystem) else ""
            if routing:  # several replicas: where the calls went, beside the system in the report
                outcome.described[system.name] += f"; {routing}"
                progress(f"-- {system.name}: {routing}")
        finally:
            await system.close()
    return outcome


def run_bench(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    factories = plan_systems(args)
    workloads = plan_workloads(args)
    for w in workloads:
        d = w.describe()
        say(f"workload {w.name}: {d['requests']} requests, {d['candidates']} candidates, {d['steps']} steps ({w.source})")
    meta = _meta(args, workloads, sys.argv[2:] if argv is None else argv)
    out = Path(args.out) if args.out else Path(time.strftime("stepscore-bench-%Y%m%d-%H%M%S"))
    outcome = Outcome()
    interrupted = False
    try:
        asyncio.run(run_systems(factories, workloads, args, say, outcome))
    except KeyboardInterrupt:
        # Ctrl-C: what was measured so far is still worth a report, labelled for what it is
        interrupted = True
        outcome.missing.append("interrupted (Ctrl-C) before every system and workload was measured")
    meta["systems"] = outcome.described
    if outcome.missing:
        meta["partial"] = outcome.missing
    files = write_report(outcome.summaries, out, meta)
    say(f"wrote {files.json}, {files.markdown}" + "".join(f", {p}" for p in files.plots))
    if files.note:
        say(files.note)
    if outcome.missing:
        say(f"PARTIAL RUN: {len(outcome.missing)} part(s) not measured:")
        for line in outcome.missing:
            say(f"  - {line}")
        return 130 if interrupted else 1
    return 0
