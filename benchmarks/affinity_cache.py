"""The prefix cache behind several replicas: does routing by search id keep the hit rate of one replica?

`stepscore serve` on loopback (the CPU suite's benchmark model, prefix cache 256 MiB each), driven by the systems
`stepscore bench --target` uses: one replica; then three, which `stepscore bench --target A,B,C` runs twice, with
the client's ring_hash on the search id (the `x-stepscore-search-id` header: a search's calls on one replica)
and with round_robin (calls in turn, as a balancer that knows nothing of searches). Workloads: `step-by-step` and
`beam` from ../shared/data, each search's calls in order, 8 callers. The hit rate is the share of the tokens the
servers answered from their caches (each call's cached_tokens); every setup starts with empty caches. Writes
the `affinity` section of benchmarks/RESULTS.md.

    python -m benchmarks.affinity_cache [--requests 160]   # calls per workload (whole searches)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from benchmarks.cpu_suite import SHARED, build_model, environment, log, write_section
from stepscore.runtime.bench import summarize, sweep
from stepscore.runtime.bench.report import Summary
from stepscore.runtime.bench.systems import LocalServer, ServiceSystem
from stepscore.runtime.bench.workloads import load_workload
from stepscore.runtime.types import ScoreRequest

CALLERS = 8
REPLICAS = 3


async def measure(targets: Sequence[str], requests: Sequence[ScoreRequest], workload: str) -> list[Summary]:
    """One replica (`targets` of one), or several with affinity and with round_robin: one summary each."""
    if len(targets) == 1:
        systems = [ServiceSystem(targets[0], name="one replica")]
    else:
        several = "ipv4:" + ",".join(targets)
        systems = [
            ServiceSystem(several, name=f"{len(targets)}, ring_hash", affinity=True),
            ServiceSystem(several, name=f"{len(targets)}, round_robin", affinity=False),
        ]
    out = []
    for system in systems:
        await system.setup()
        try:
            # sweep() empties the caches first (EndSearch of what the last system sent, on every replica)
            [point] = await sweep(system, requests, workload=workload, concurrency=(CALLERS,))
            await system.forget()
        finally:
            await system.close()
        s = summarize(point)
        routing = system.routing()
        log(f"  {s.system:<16} hit {s.cache_hit:6.1%}  {s.tokens_per_s:8,.0f} tok/s  errors {s.errors}  {routing}")
        out.append(s)
    return out


def run(bundle: Path, replicas: int, requests: Sequence[ScoreRequest], workload: str) -> list[Summary]:
    servers = [LocalServer(bundle, ["--cache-mb", "256", "--replica-id", f"r{i}"]) for i in range(replicas)]
    try:
        targets = [s.start() for s in servers]
        return asyncio.run(measure(targets, requests, workload))
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=160, help="calls per workload (whole searches)")
    args = parser.parse_args()
    _, bundle = build_model()
    rows = []
    for name in ("step-by-step", "beam"):
        wl = load_workload(name, SHARED / "data", limit=args.requests)
        log(f"{name}: {len(wl.requests)} calls")
        [one] = run(bundle, 1, wl.requests, name)
        ring, spread = run(bundle, REPLICAS, wl.requests, name)
        for s in (one, ring, spread):
            p50 = (s.latency_ms or {}).get("p50", float("nan"))
            kept = f"{s.cache_hit / one.cache_hit:.0%}" if one.cache_hit else "n/a"
            rows.append(
                f"| {name} | {s.system} | {s.requests - s.errors}/{s.requests} | {s.cache_hit:.1%} | {kept} | "
                f"{s.tokens_per_s:,.0f} | {p50:,.0f} |"
            )
    table = "\n".join(rows)
    command = f"python -m benchmarks.affinity_cache --requests {args.requests}"
    body = f"""## Prefix cache behind replicas: hit rate with and without search affinity (CPU)

{environment()}. Command: `{command}`.
The CPU suite's benchmark model, `--cache-mb 256` per replica, on loopback; {CALLERS} callers, each search's calls
in order; the systems are those of `stepscore bench --target A,B,C` (service-affinity: ring_hash on the search
id; service-round-robin: calls in turn, search ids ignored). Hit rate: the share of the calls' tokens the
servers answered from their caches; every setup starts with empty caches. All replicas share this machine's
two cores, so tokens/s says how much work the caches saved, not how three machines would scale.

| workload | setup | calls answered | hit rate | of one replica's | tokens/s | p50 ms |
|---|---|---|---|---|---|---|
{table}

Target (scale-out issue): three replicas keep >= 90% of the single replica's hit rate.
"""
    write_section("affinity", body)


if __name__ == "__main__":
    main()
