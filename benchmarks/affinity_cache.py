"""The prefix cache behind several replicas: does routing by search id keep the hit rate of one replica?

Three setups of `stepscore serve` on loopback (the CPU suite's benchmark model, prefix cache 256 MiB each): one replica; three
replicas behind the client's ring_hash on the search id (the `x-stepscore-search-id` header); the same three with
calls sent without a search id (spread at random, as a plain balancer would). Workloads: `step-by-step` and
`beam` from ../shared/data, each search's calls sent in order, 8 searches at a time. The hit rate is the servers'
own count (stepscore_prefix_cache_tokens_total, summed over replicas). Writes the `affinity` section of
benchmarks/RESULTS.md.

    python -m benchmarks.affinity_cache [--requests 160]   # calls per workload (whole searches)
"""

from __future__ import annotations

import argparse
import asyncio
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from benchmarks.cpu_suite import SHARED, build_model, cmd_line, environment, log, write_section
from stepscore.errors import InvalidRequest
from stepscore.runtime.bench.systems import LocalServer, parse_prometheus
from stepscore.runtime.bench.workloads import load_workload
from stepscore.runtime.client import AsyncClient
from stepscore.runtime.types import ScoreRequest

SEARCHES_AT_ONCE = 8


def hits(servers: Sequence[LocalServer]) -> tuple[float, float, list[float]]:
    """Hit and miss tokens over all replicas, and each replica's share of the tokens (how the calls spread)."""
    hit = miss = 0.0
    per: list[float] = []
    for server in servers:
        url = server.metrics_url
        assert url is not None
        metrics = parse_prometheus(urllib.request.urlopen(url, timeout=10).read().decode())
        h = metrics.get('stepscore_prefix_cache_tokens_total{kind="hit"}', 0.0)
        m = metrics.get('stepscore_prefix_cache_tokens_total{kind="miss"}', 0.0)
        hit, miss = hit + h, miss + m
        per.append(h + m)
    return hit, miss, [t / max(1.0, sum(per)) for t in per]


async def drive(target: str, requests: Sequence[ScoreRequest], with_ids: bool) -> None:
    """Each search's calls in order, SEARCHES_AT_ONCE searches at a time."""
    searches: dict[str, list[ScoreRequest]] = {}
    for r in requests:
        searches.setdefault(r.search_id, []).append(r if with_ids else replace(r, search_id=""))
    queue = list(searches.values())
    async with AsyncClient(target) as client:

        async def worker() -> None:
            while queue:
                for request in queue.pop(0):
                    try:
                        await client.score(request)
                    except InvalidRequest:  # longer than the model's context: the search's later calls are longer still
                        break

        await asyncio.gather(*(worker() for _ in range(SEARCHES_AT_ONCE)))


def run(bundle: Path, replicas: int, requests: Sequence[ScoreRequest], with_ids: bool) -> tuple[float, str]:
    """The hit rate, and how the tokens spread over the replicas."""
    servers = [LocalServer(bundle, ["--cache-mb", "256", "--replica-id", f"r{i}"]) for i in range(replicas)]
    try:
        targets = [s.start() for s in servers]
        target = targets[0] if replicas == 1 else "ipv4:" + ",".join(targets)
        asyncio.run(drive(target, requests, with_ids))
        hit, miss, shares = hits(servers)
    finally:
        for s in servers:
            s.stop()
    return hit / max(1.0, hit + miss), " / ".join(f"{x:.0%}" for x in shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=160, help="calls per workload (whole searches)")
    args = parser.parse_args()
    _, bundle = build_model()
    rows = []
    for name, limit in (("step-by-step", args.requests), ("beam", args.requests)):
        wl = load_workload(name, SHARED / "data", limit=limit)
        one, _ = run(bundle, 1, wl.requests, True)
        ring, ring_split = run(bundle, 3, wl.requests, True)
        spread, spread_split = run(bundle, 3, wl.requests, False)
        log(f"{name}: one {one:.1%}; ring_hash {ring:.1%} ({ring_split}); no search ids {spread:.1%} ({spread_split})")
        rows.append(
            f"| {name} | {len(wl.requests)} | {one:.1%} | {ring:.1%} ({ring / one:.0%} of one; tokens {ring_split}) | "
            f"{spread:.1%} ({spread / one:.0%} of one; tokens {spread_split}) |"
        )
    table = "\n".join(rows)
    body = f"""## Prefix cache behind replicas: hit rate with and without search affinity (CPU)

{environment()}. Command: `{cmd_line().replace("benchmarks.cpu_suite", "benchmarks.affinity_cache")}`.
The CPU suite's benchmark model, `--cache-mb 256` per replica, on loopback; {SEARCHES_AT_ONCE} searches at a time,
each search's calls in order (a search stops at a call longer than the model's context); the hit rate is the
share of candidate tokens the servers answered from their caches.

| workload | calls | one replica | three, ring_hash on the search id (tokens per replica) | three, no search id (random) |
|---|---|---|---|---|
{table}

Target (scale-out issue): three replicas keep >= 90% of the single replica's hit rate.
"""
    write_section("affinity", body)


if __name__ == "__main__":
    main()
