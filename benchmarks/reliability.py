"""Hostile and careless clients against a live `stepscore serve`: the figures in docs/reliability.md.

    python -m benchmarks.reliability stream            # sends on a ScoreStream, never reads: server RSS growth
    python -m benchmarks.reliability flood             # one stream floods the queue: another client's latency
    python -m benchmarks.reliability storm             # refusal latency while the queue is full and clients keep calling
    python -m benchmarks.reliability big               # a 15 MiB problem: time to refuse it, another client meanwhile
    python -m benchmarks.reliability deadline          # a request at the size limits with a 100 ms deadline: CPU after it
    python -m benchmarks.reliability soak --minutes 30 # mixed traffic; RSS slope once both caches are full

Each prints one JSON object with its figures (and appends it to --out when given). The server is the real
`stepscore serve` in its own process (tests/helpers/server.py), serving a small Qwen2-shaped PRM with random
weights and the real Qwen2.5-Math-PRM tokenizer from ../shared/tokenizers (what tokenization costs depends on
the tokenizer, not on the weights), exported once into benchmarks/.cache/. Its memory is read from
/proc/<pid>/status (VmRSS), its CPU time from /proc/<pid>/stat.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SHARED = ROOT.parent / "shared"
# small body, real vocabulary: the 151k x 128 embedding is most of the model; 4096 positions fit 2,500-token requests
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, vocab_size=151936)  # fmt: skip
WORDS = "we add the two numbers then multiply by four so the total is twenty and check each step again".split()
PROBLEM = "What is (2+3)*4? Show each step."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bundle() -> Path:
    """The benchmark PRM's fp32 bundle, exported once (needs the export extra and ../shared/tokenizers)."""
    folder, out = CACHE / "reliability-prm", CACHE / "reliability-prm-fp32"
    if (out / "manifest.json").is_file():
        return out
    tok = SHARED / "tokenizers" / "qwen2.5-math-prm"
    if not tok.is_dir():
        raise SystemExit(f"{tok} is missing: these measurements use the real Qwen tokenizer from ../shared")
    from benchmarks.models import write_random_prm
    from stepscore.export.pipeline import export_model

    write_random_prm(folder, SHAPE, dtype="float32", tokenizer=tok, system_prompt=None)
    export_model(str(folder), out, precision="fp32", force=True, progress=lambda line: log("  " + line))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def score_call(channel: Any) -> Any:
    """The Score method of a channel (grpc or grpc.aio), wire messages in and out."""
    from stepscore.v1 import stepscore_pb2 as pb

    return channel.unary_unary(
        "/stepscore.v1.StepScorer/Score",
        request_serializer=pb.ScoreRequest.SerializeToString,
        response_deserializer=pb.ScoreResponse.FromString,
    )


def stream_call(channel: Any) -> Any:
    from stepscore.v1 import stepscore_pb2 as pb

    return channel.stream_stream(
        "/stepscore.v1.StepScorer/ScoreStream",
        request_serializer=pb.ScoreRequest.SerializeToString,
        response_deserializer=pb.ScoreStreamResponse.FromString,
    )


def candidates(*steps: list[str]) -> list[Any]:
    from stepscore.v1 import stepscore_pb2 as pb

    return [pb.Candidate(steps=pb.Steps(steps=s)) for s in steps]


def percentile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))] if ys else float("nan")


def steps_of(chars: int, seed: int, words: int = 40) -> list[str]:
    """Steps of `words` words of ordinary text totalling about `chars` characters (~4 characters a token)."""
    rng = random.Random(seed)
    steps, total = [], 0
    while total < chars:
        step = " ".join(rng.choices(WORDS, k=words)) + "."
        steps.append(step)
        total += len(step)
    return steps


def report(args: argparse.Namespace, name: str, figures: dict[str, Any]) -> None:
    figures = {"attack": name, "command": "python -m benchmarks.reliability " + " ".join(sys.argv[1:]), **figures}
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(figures) + "\n")


# --- attacks ---------------------------------------------------------------------------------------


def attack_stream(args: argparse.Namespace) -> None:
    """A client opens a ScoreStream and sends ~2,500-token requests as fast as it can, never reading."""
    import grpc

    from stepscore.v1 import stepscore_pb2 as pb
    from tests.helpers.server import read_metric, serve

    mport = free_port()
    steps = steps_of(args.chars, 1, args.step_words)
    with serve(bundle(), "--metrics-port", str(mport), *args.server_args) as server:
        pid = server.proc.pid
        sent = 0
        stop = threading.Event()

        def requests() -> Iterator[Any]:
            nonlocal sent
            while not stop.is_set():
                sent += 1
                yield pb.ScoreRequest(
                    request_id=f"r{sent}", problem=PROBLEM, candidates=[pb.Candidate(steps=pb.Steps(steps=steps))]
                )

        channel = grpc.insecure_channel(server.target)
        call = stream_call(channel)(requests())
        base = rss_mb(pid)
        samples = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.seconds:
            samples.append((round(elapsed, 1), round(rss_mb(pid) - base, 1)))
            time.sleep(1.0)
        growth = rss_mb(pid) - base
        warm = next(g for t, g in samples if t >= 10.0)
        stalls = read_metric(mport, "stepscore_stream_stalls_total")
        handled = read_metric(mport, "stepscore_requests_total", method="ScoreStream")
        answers, status = 0, "ended normally"
        stop.set()  # the client stops sending (half-closes once its writer thread sees it) and reads
        try:
            for _ in call:  # now read: what the server kept for this client, then its status
                answers += 1
        except grpc.RpcError as err:
            status = f"{err.code().name}: {err.details()}"
        channel.close()
    report(
        args,
        "stream",
        {
            "seconds": args.seconds,
            "request_chars": sum(map(len, steps)) + len(PROBLEM),
            "steps_per_request": len(steps),
            "rss_growth_mb": round(growth, 1),
            "rss_growth_after_10s_mb": round(growth - warm, 1),
            "rss_max_growth_mb": max(g for _, g in samples),
            "requests_sent_by_client": sent,
            "requests_handled_by_server": int(handled),
            "answers_read_afterwards": answers,
            "stream_stalls_metric": int(stalls),
            "client_status": status,
            "rss_samples": samples[:: max(1, len(samples) // 12)],
        },
    )


def histogram_quantile(port: int, name: str, q: float, **labels: str) -> float:
    """The upper bound of the bucket holding quantile `q` of a live server's histogram (Prometheus style)."""
    from tests.helpers.server import metric_samples

    buckets = sorted(
        (float(le), count)
        for le, count in (
            (got["le"], value)
            for got, value in metric_samples(port, name + "_bucket")
            if all(got.get(k) == v for k, v in labels.items())
        )
        if le != "+Inf"
    )
    total = next(
        (v for got, v in metric_samples(port, name + "_count") if all(got.get(k) == w for k, w in labels.items())), 0.0
    )
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("inf")


PREBUILT = 64  # the filler's distinct heavy requests (about one is answered every 3 s on 2 cores)


def _fill(target: str, count: int, stop: Any) -> None:
    """Keep `count` heavy Score calls in flight until `stop` is set (run in its own process, so that the storm
    client's timings are not its own event loop's delays)."""
    import grpc

    from stepscore.v1 import stepscore_pb2 as pb

    def build(n: int) -> Any:
        return pb.ScoreRequest(
            problem=f"{PROBLEM} (#{n})", candidates=candidates(*(steps_of(2000, n * 32 + k) for k in range(32)))
        )

    # New text every call: a repeated request would be answered from the prefix cache (a few ms, no model run),
    # and the storm would measure tokenization instead of a server whose cores the model keeps busy. Built
    # before the storm, so that building them does not take the cores from the server and the storm's client
    # (the filler stands in for clients on other machines); more are built only past PREBUILT calls.
    prebuilt = [build(n) for n in range(PREBUILT)]
    calls = itertools.count()
    lock = threading.Lock()

    def heavy() -> Any:
        with lock:
            n = next(calls)
        return prebuilt[n] if n < PREBUILT else build(n)

    def loop() -> None:
        channel = grpc.insecure_channel(target)
        call = score_call(channel)
        request = heavy()
        while not stop.is_set():
            try:
                call(request)
                request = heavy()  # a refused one is sent again: only answered ones are in the cache
            except grpc.RpcError:
                time.sleep(0.001)
        channel.close()

    threads = [threading.Thread(target=loop) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def attack_storm(args: argparse.Namespace) -> None:
    """Heavy requests (from another process) keep a small queue full; small Score calls arrive at --rate per
    second (open loop: a slow answer does not slow the storm down), over --clients channels; refusals are timed."""
    import multiprocessing

    import grpc

    from stepscore.v1 import stepscore_pb2 as pb
    from tests.helpers.server import serve

    small = pb.ScoreRequest(problem=PROBLEM, candidates=candidates(["2+3=5.", "5*4=20."]))
    mport = free_port()
    server_args = ["--max-queued-requests", str(args.queue), "--metrics-port", str(mport), *args.server_args]

    async def run(target: str) -> dict[str, Any]:
        channels = [grpc.aio.insecure_channel(target) for _ in range(args.clients)]
        refused: list[float] = []
        outcomes: dict[str, int] = {}

        async def one(k: int) -> None:
            t0 = time.perf_counter()
            try:
                await score_call(channels[k % args.clients])(small)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            outcomes[code] = outcomes.get(code, 0) + 1
            if code == "RESOURCE_EXHAUSTED":
                refused.append(time.perf_counter() - t0)

        calls: list[asyncio.Task[None]] = []
        started = time.monotonic()
        k = 0
        while (elapsed := time.monotonic() - started) < args.seconds:
            due = int(elapsed * args.rate) + 1
            while k < due:
                calls.append(asyncio.create_task(one(k)))
                k += 1
            await asyncio.sleep(0.0005)
        await asyncio.gather(*calls)
        for channel in channels:
            await channel.close()
        ms = [x * 1000 for x in refused]
        method = "/stepscore.v1.StepScorer/Score"
        server_p50 = histogram_quantile(mport, "stepscore_call_seconds", 0.5, method=method, code="RESOURCE_EXHAUSTED")
        server_p99 = histogram_quantile(mport, "stepscore_call_seconds", 0.99, method=method, code="RESOURCE_EXHAUSTED")
        return {
            "calls": k,
            "outcomes": outcomes,
            "client_refusal_p50_ms": round(percentile(ms, 0.5), 3),
            "client_refusal_p99_ms": round(percentile(ms, 0.99), 3),
            "client_refusal_max_ms": round(max(ms), 3) if ms else None,
            "server_refusal_p50_ms_at_most": server_p50 * 1000,
            "server_refusal_p99_ms_at_most": server_p99 * 1000,
        }

    with serve(bundle(), *server_args) as server:
        stop = multiprocessing.Event()
        filler = multiprocessing.Process(target=_fill, args=(server.target, args.queue + 2, stop))
        filler.start()
        time.sleep(3.0)  # the queue fills
        try:
            figures = asyncio.run(run(server.target))
        finally:
            stop.set()
            filler.join()
    report(
        args,
        "storm",
        {
            "seconds": args.seconds,
            "rate_per_s": args.rate,
            "clients": args.clients,
            "queue": args.queue,
            **figures,
            "machine_load_average_1min": round(os.getloadavg()[0], 1),
        },
    )


def attack_flood(args: argparse.Namespace) -> None:
    """One stream sends ~2,500-token requests without pause (and reads its answers); meanwhile another client
    sends one small request every 100 ms: its latency and refusals are what one stream can do to others."""
    import grpc

    from stepscore.v1 import stepscore_pb2 as pb
    from tests.helpers.server import serve

    steps = steps_of(args.chars, 1, args.step_words)
    small = pb.ScoreRequest(problem=PROBLEM, candidates=candidates(["2+3=5.", "5*4=20."]))
    with serve(bundle(), *args.server_args) as server:
        stop = threading.Event()
        flooded = 0

        def requests() -> Iterator[Any]:
            k = 0
            while not stop.is_set():
                k += 1
                yield pb.ScoreRequest(request_id=f"f{k}", problem=PROBLEM, candidates=candidates(steps))

        def flood() -> None:
            nonlocal flooded
            channel = grpc.insecure_channel(server.target)
            try:
                for _ in stream_call(channel)(requests()):
                    flooded += 1
            except grpc.RpcError:
                pass
            channel.close()

        thread = threading.Thread(target=flood)
        thread.start()
        time.sleep(3.0)  # the flood is under way
        channel = grpc.insecure_channel(server.target)
        call = score_call(channel)
        latencies: list[float] = []
        refused = 0
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            t0 = time.perf_counter()
            try:
                call(small, timeout=60)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError:
                refused += 1
            time.sleep(0.1)
        stop.set()
        thread.join()
        channel.close()
    ms = [x * 1000 for x in latencies]
    report(
        args,
        "flood",
        {
            "seconds": args.seconds,
            "request_chars": sum(map(len, steps)) + len(PROBLEM),
            "flood_answers": flooded,
            "other_requests": len(ms) + refused,
            "other_refused": refused,
            "other_p50_ms": round(percentile(ms, 0.5), 1),
            "other_p99_ms": round(percentile(ms, 0.99), 1),
            "other_max_ms": round(max(ms), 1) if ms else None,
            "machine_load_average_1min": round(os.getloadavg()[0], 1),
        },
    )


def attack_big(args: argparse.Namespace) -> None:
    """One 15 MiB problem; meanwhile another client sends small requests one after another."""
    import grpc

    from stepscore.v1 import stepscore_pb2 as pb
    from tests.helpers.server import serve

    big = pb.ScoreRequest(problem="word " * (15 * 1024 * 1024 // 5), candidates=candidates(["a"]))
    small = pb.ScoreRequest(problem=PROBLEM, candidates=candidates(["2+3=5.", "5*4=20."]))
    with serve(bundle(), "--max-receive-message-bytes", str(32 << 20), *args.server_args) as server:
        pid = server.proc.pid
        channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 32 << 20)])
        call = score_call(channel)
        call(small)  # warm
        base = rss_mb(pid)
        done = threading.Event()
        others: list[float] = []

        def other() -> None:
            ch = grpc.insecure_channel(server.target)
            c = score_call(ch)
            while not done.is_set():
                t0 = time.perf_counter()
                c(small)
                others.append(time.perf_counter() - t0)
            ch.close()

        thread = threading.Thread(target=other)
        thread.start()
        times = []
        outcome = ""
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            try:
                call(big)
                outcome = "OK"
            except grpc.RpcError as err:
                outcome = f"{err.code().name}: {err.details()}"
            times.append(time.perf_counter() - t0)
        done.set()
        thread.join()
        time.sleep(5.0)
        after = rss_mb(pid) - base
        channel.close()
    report(
        args,
        "big",
        {
            "problem_bytes": len(big.problem),
            "refusal_seconds": [round(t, 4) for t in times],
            "outcome": outcome,
            "other_client_max_ms": round(max(others) * 1000, 1),
            "other_client_p50_ms": round(percentile(others, 0.5) * 1000, 1),
            "rss_growth_5s_after_mb": round(after, 1),
        },
    )


def attack_deadline(args: argparse.Namespace) -> None:
    """A request at the size limits with a 100 ms deadline, and one with a million candidates."""
    import grpc

    from stepscore.v1 import stepscore_pb2 as pb
    from tests.helpers.server import serve

    rng = random.Random(3)
    # 1,000 candidates x 4 steps x ~1,000 characters: just under the 4 Mi-character request limit, all unique
    cands = [
        pb.Candidate(steps=pb.Steps(steps=[" ".join(rng.choices(WORDS, k=180))[:1000] for _ in range(4)])) for _ in range(1000)
    ]
    wide = pb.ScoreRequest(problem=PROBLEM, candidates=cands, timeout_ms=100)
    million = pb.ScoreRequest(problem=PROBLEM, candidates=[pb.Candidate(steps=pb.Steps(steps=["a"]))] * 1_000_000)
    with serve(bundle(), *args.server_args) as server:
        pid = server.proc.pid
        channel = grpc.insecure_channel(server.target)
        call = score_call(channel)
        idle0 = cpu_seconds(pid)
        time.sleep(2.0)
        idle_rate = (cpu_seconds(pid) - idle0) / 2.0
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(pid)
        try:
            call(wide)
            outcome = "OK"
        except grpc.RpcError as err:
            outcome = f"{err.code().name}: {err.details()}"
        answered = time.perf_counter() - t0
        time.sleep(5.0)
        after = cpu_seconds(pid) - cpu0 - idle_rate * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            call(million)
            m_outcome = "OK"
        except grpc.RpcError as err:
            m_outcome = f"{err.code().name}: {err.details()}"
        m_seconds = time.perf_counter() - t1
        channel.close()
    report(
        args,
        "deadline",
        {
            "wide_request_chars": sum(len(s) for c in cands for s in c.steps.steps) + len(PROBLEM) * len(cands),
            "wide_outcome": outcome,
            "wide_answered_after_s": round(answered, 3),
            "server_cpu_s_from_send_to_5s_after_answer": round(after, 3),
            "million_candidates_outcome": m_outcome,
            "million_candidates_refused_after_s": round(m_seconds, 3),
        },
    )


def attack_soak(args: argparse.Namespace) -> None:
    """Mixed traffic for --minutes: Best-of-N with unique problems (the text cache fills and churns), beam-search
    style prefixes, streams, invalid and cancelled requests. RSS every 10 s; slope after --warmup minutes."""
    import grpc

    from stepscore.v1 import stepscore_pb2 as pb
    from tests.helpers.server import read_metric, serve

    def request(rng: random.Random, k: int) -> Any:
        problem = f"Problem {k}: " + " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
        prefix = [" ".join(rng.choices(WORDS, k=20)) for _ in range(rng.randint(0, 4))]

        def sentence() -> str:
            return " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))

        cands = candidates(*([sentence() for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 16))))
        return pb.ScoreRequest(request_id=f"s{k}", problem=problem, prefix_steps=prefix, candidates=cands, aggregates=["min"])

    stop = threading.Event()
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1

    def unary_client(target: str, seed: int) -> None:
        rng = random.Random(seed)
        ch = grpc.insecure_channel(target)
        call = score_call(ch)
        k = 0
        while not stop.is_set():
            k += 1
            msg = request(rng, seed * 10_000_000 + k)
            roll = rng.random()
            try:
                if roll < 0.05:
                    msg.aggregates.append("no-such-aggregate")  # invalid (an empty step is valid since it became scorable)
                    call(msg)
                elif roll < 0.1:
                    future = call.future(msg)
                    time.sleep(0.002)
                    future.cancel()
                    count("CANCELLED_BY_CLIENT")
                    continue
                else:
                    call(msg, timeout=30)
                count("OK")
            except grpc.RpcError as err:
                count(err.code().name)
        ch.close()

    def stream_client(target: str, seed: int) -> None:
        rng = random.Random(seed)
        ch = grpc.insecure_channel(target)
        call = stream_call(ch)
        k = 0
        while not stop.is_set():
            batch = []
            for _ in range(16):
                k += 1
                batch.append(request(rng, seed * 10_000_000 + k))
            for answer in call(iter(batch)):
                count("STREAM_" + ("OK" if answer.WhichOneof("result") == "response" else "ERROR"))
        ch.close()

    mport = free_port()
    # both caches' budgets given, not left to the server's defaults: the prefix cache's default is an eighth of the
    # memory available at start-up (~2.9 GB on a 24 GB machine), and while a cache fills RSS follows it: the slope
    # would measure the cache filling, not a leak. The warm-up waits for both; the slope of RSS minus the caches
    # is reported beside RSS's
    budgets = ["--text-cache-mb", str(args.text_cache_mb), "--cache-mb", str(args.prefix_cache_mb)]
    with serve(bundle(), "--metrics-port", str(mport), *budgets, *args.server_args) as server:
        pid = server.proc.pid
        # the start-up line ends with the malloc the server runs on (stepscore.runtime.allocator)
        startup = [line for line in server.output if " INFO " in line and "; allocator" in line]
        malloc = startup[0].rsplit("; ", 1)[1].strip() if startup else "not in the start-up line"
        # the budgets the server reports (flags after `--` may have replaced the soak's)
        prefix_budget = read_metric(mport, "stepscore_prefix_cache_budget_bytes") / (1 << 20)
        threads = [threading.Thread(target=unary_client, args=(server.target, s)) for s in (1, 2)]
        threads.append(threading.Thread(target=stream_client, args=(server.target, 3)))
        for t in threads:
            t.start()
        samples: list[Sample] = []
        # warm-up lasts until each cache first reaches 95% of its budget: until then RSS grows by what they take
        text_full_at = prefix_full_at = float("inf")
        started = time.monotonic()
        try:
            while (elapsed := time.monotonic() - started) < args.minutes * 60:
                minute = elapsed / 60.0
                text = read_metric(mport, "stepscore_text_cache_bytes") / (1 << 20)
                prefix = read_metric(mport, "stepscore_prefix_cache_bytes") / (1 << 20)
                entries = read_metric(mport, "stepscore_prefix_cache_entries")
                samples.append(Sample(minute, rss_mb(pid), text, prefix, int(entries)))
                if text >= 0.95 * args.text_cache_mb and text_full_at == float("inf"):
                    text_full_at = minute
                if prefix >= 0.95 * prefix_budget and prefix_full_at == float("inf"):
                    prefix_full_at = minute
                log(
                    f"soak {minute:5.1f} min  rss {samples[-1].rss:7.1f} MB  text cache {text:5.1f} MB  "
                    f"prefix cache {prefix:6.1f} MB  {counts}"
                )
                time.sleep(10.0)
            evictions = read_metric(mport, "stepscore_prefix_cache_evictions_total")  # a counter: _total
        finally:
            stop.set()
            for t in threads:
                t.join()
    caches_full_at = max(text_full_at, prefix_full_at)
    warmup = max(args.warmup, caches_full_at if caches_full_at < args.minutes else args.warmup)
    after = [s for s in samples if s.minute >= warmup]
    last = samples[-1]

    def minute_or_none(m: float) -> float | None:
        return round(m, 1) if m < args.minutes else None

    report(
        args,
        "soak",
        {
            "minutes": args.minutes,
            "allocator": malloc,
            "warmup_minutes": round(warmup, 1),
            "text_cache_budget_mb": args.text_cache_mb,
            "prefix_cache_budget_mb": round(prefix_budget, 1),
            "text_cache_full_at_minute": minute_or_none(text_full_at),
            "prefix_cache_full_at_minute": minute_or_none(prefix_full_at),
            "rss_slope_mb_per_min_after_warmup": round(slope([(s.minute, s.rss) for s in after]), 3),
            # what is neither cache: a leak shows here even while a cache is still filling
            "rss_minus_caches_slope_mb_per_min_after_warmup": round(
                slope([(s.minute, s.rss - s.text - s.prefix) for s in after]), 3
            ),
            "rss_at_warmup_mb": round(after[0].rss, 1),
            "rss_end_mb": round(last.rss, 1),
            "rss_max_after_warmup_mb": round(max(s.rss for s in after), 1),
            # single samples swing by tens of MB (the backend gives memory back every 2 s): the first and last
            # 5 minutes' medians compare levels
            "rss_median_first_5min_after_warmup_mb": round(statistics.median(s.rss for s in after if s.minute < warmup + 5), 1),
            "rss_median_last_5min_mb": round(statistics.median(s.rss for s in after if s.minute >= last.minute - 5), 1),
            "rss_minus_caches_at_warmup_mb": round(after[0].rss - after[0].text - after[0].prefix, 1),
            "rss_minus_caches_end_mb": round(last.rss - last.text - last.prefix, 1),
            "text_cache_mb_at_end": round(last.text, 1),
            "prefix_cache_mb_at_end": round(last.prefix, 1),
            "prefix_cache_entries_at_end": last.entries,
            "prefix_cache_evictions": int(evictions),
            "rss_every_10s_mb": [round(s.rss, 1) for s in samples],
            "prefix_cache_every_10s_mb": [round(s.prefix, 1) for s in samples],
            # the budget counts K/V bytes only: each entry's tree node and token ids are outside it
            "prefix_cache_entries_every_10s": [s.entries for s in samples],
            "outcomes": counts,
        },
    )


class Sample(NamedTuple):
    """One soak sample (MiB): the server's VmRSS and what its two caches say they hold."""

    minute: float
    rss: float
    text: float
    prefix: float
    entries: int  # the prefix cache's segments


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (nan with fewer than two distinct x)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    try:
        return statistics.linear_regression(xs, ys).slope
    except statistics.StatisticsError:  # fewer than two points, or x constant
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("attack", choices=("stream", "flood", "storm", "big", "deadline", "soak"))
    parser.add_argument("--seconds", type=float, default=61.0, help="stream, flood, storm: how long the attack runs")
    parser.add_argument("--chars", type=int, default=10_000, help="stream: characters per request (~2,500 tokens)")
    parser.add_argument("--step-words", type=int, default=40, help="stream: words per step (fewer: more steps, longer answers)")
    parser.add_argument("--clients", type=int, default=32, help="storm: client channels the calls are spread over")
    parser.add_argument("--rate", type=float, default=1000.0, help="storm: calls per second (open loop)")
    parser.add_argument("--queue", type=int, default=8, help="storm: --max-queued-requests of the server")
    parser.add_argument("--repeat", type=int, default=10, help="big: how many 15 MiB requests")
    parser.add_argument("--minutes", type=float, default=30.0, help="soak: duration")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="soak: minutes left out of the slope, at least (and until both caches fill)"
    )
    # --cache-mb was this option's old name (the server's --cache-mb is the prefix cache: give that as --prefix-cache-mb)
    parser.add_argument("--text-cache-mb", "--cache-mb", type=int, default=64, help="soak: the server's --text-cache-mb")
    parser.add_argument(
        "--prefix-cache-mb", type=int, default=64, help="soak: the server's --cache-mb (prefix cache; -1: the server's default)"
    )
    parser.add_argument("--out", default="", help="append the JSON figures to this file")
    args, rest = parser.parse_known_args()  # the rest, after --: extra `stepscore serve` flags
    args.server_args = [a for a in rest if a != "--"]
    {
        "stream": attack_stream,
        "flood": attack_flood,
        "storm": attack_storm,
        "big": attack_big,
        "deadline": attack_deadline,
        "soak": attack_soak,
    }[args.attack](args)


if __name__ == "__main__":
    main()
