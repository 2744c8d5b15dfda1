"""What client-side routing costs per call: three replicas of the embedded model on loopback, the same small
request sent to one replica directly (pick_first) and through the balancing client (ring_hash on a search id
that the ring maps to that same replica). Prints p50/p90 per round; no assertion (a shared machine is noisy).

    python benchmarks/routing_overhead.py [--calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from stepscore.runtime.bench.systems import LocalServer
from stepscore.runtime.client import Client
from stepscore.runtime.default_model import default_bundle

PROBLEM, STEPS = "(1+2)*2", [["1+2=3", "3*2=6"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    servers = [LocalServer(default_bundle(), ["--replica-id", f"r{i}"], metrics=False) for i in range(3)]
    try:
        targets = [s.start() for s in servers]
        with Client(targets[0]) as direct, Client("ipv4:" + ",".join(targets)) as balanced:
            # a search id the ring maps to r0, so that both paths end at the same server
            sid = next(f"s{k}" for k in range(1000) if balanced.score(PROBLEM, STEPS, search_id=f"s{k}").replica == "r0")
            paths: dict[str, Callable[[], object]] = {
                "direct": lambda: direct.score(PROBLEM, STEPS),
                "ring_hash": lambda: balanced.score(PROBLEM, STEPS, search_id=sid),
            }
            for rnd in range(args.rounds):
                for name, call in paths.items():
                    for _ in range(20):  # burn-in
                        call()
                    ms = []
                    for _ in range(args.calls):
                        started = time.perf_counter()
                        call()
                        ms.append((time.perf_counter() - started) * 1000)
                    p90 = statistics.quantiles(ms, n=10)[8]
                    print(f"round {rnd} {name:9s} p50 {statistics.median(ms):.2f} ms  p90 {p90:.2f} ms", flush=True)
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
