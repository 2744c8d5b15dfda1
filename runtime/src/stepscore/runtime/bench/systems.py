"""The systems a benchmark drives, behind one small interface.

| system     | what it is                                                                                      |
|------------|-------------------------------------------------------------------------------------------------|
| engine     | stepscore's engine in this process (scheduler, packing, shared prefixes)                        |
| service    | a `stepscore serve` over gRPC: one given by address, or one this process starts (`spawn`)       |
| naive-ort  | the same ONNX graph, one request at a time: formatted, padded into one batch, run, no scheduler |
| hf-eager   | Hugging Face PyTorch eager, padded batches of 8 per request, as search-and-learn's PRM wrappers  |

The two baselines are `sequential`: they take one request at a time, as the code they stand for does;
concurrent callers wait for a lock, and that wait is reported as their queue time. Every system formats
with the bundle's own format and tokenizer, so all of them compute the same tokens.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from stepscore.errors import ConfigError, StepscoreError
from stepscore.runtime.bundle import Bundle, HeadSpec, load_bundle
from stepscore.runtime.config import EngineConfig
from stepscore.runtime.formatting import Formatter
from stepscore.runtime.packing import PackOptions, pack
from stepscore.runtime.types import Formatted, ScoreRequest, ScoreResult, Timing

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BatchCounters:
    """Cumulative batch counters of a system; the difference of two snapshots describes a sweep point."""

    batches: int = 0
    tokens_submitted: int = 0  # formatted tokens of the candidates sent to batches
    tokens_used: int = 0  # tokens laid out in rows (after prefix sharing)
    tokens_computed: int = 0  # rows x row length, padding included

    def __sub__(self, other: BatchCounters) -> BatchCounters:
        return BatchCounters(
            self.batches - other.batches,
            self.tokens_submitted - other.tokens_submitted,
            self.tokens_used - other.tokens_used,
            self.tokens_computed - other.tokens_computed,
        )


class System(Protocol):
    """What the drivers need from a system under test."""

    name: str
    sequential: bool  # one request at a time by construction (a baseline)
    description: str  # what exactly ran (versions, precision, settings), for the report; set by setup()

    async def setup(self) -> None:
        """Load and warm up; called once, before any `score`."""
        ...

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """One result per request, or one of stepscore's errors."""
        ...

    async def counters(self) -> BatchCounters | None:
        """Cumulative batch counters, or None where the system cannot tell (a server without metrics)."""
        ...

    async def forget(self) -> None:
        """Empty what the system remembers between calls (its prefix cache): the drivers call it before each
        sweep point, which sends the same requests as the point before it."""
        ...

    @property
    def max_batch_tokens(self) -> int | None:
        """The token budget of one batch, for the batch fill; None where there is none."""
        ...

    async def close(self) -> None: ...


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --- the engine in this process ------------------------------------------------------------------


class EngineSystem:
    """stepscore's engine, in-process."""

    sequential = False

    def __init__(
        self,
        bundle: str | Path,
        device: str = "cpu",
        config: EngineConfig | None = None,
        devices: Sequence[int | str] | None = None,
        name: str = "engine",
    ) -> None:
        self.name = name
        self._bundle = Path(bundle)
        self._device = device
        self._config = config or EngineConfig()
        self._devices = devices
        self._engine: Any = None
        self.description = ""

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise StepscoreError(f"{self.name}: setup() was not called")
        return self._engine

    async def setup(self) -> None:
        from stepscore.runtime.engine import Engine

        engine = await _in_thread(Engine.from_bundle, self._bundle, self._device, self._config, self._devices)
        self._engine = await engine.start()
        info, cfg = engine.info(), engine.config
        self.description = (
            f"stepscore {info.stepscore_version} engine in-process, onnxruntime {info.onnxruntime_version} on "
            f"{', '.join(info.devices)}, {info.precision}; max_batch_tokens {cfg.max_batch_tokens}, row_tokens "
            f"{cfg.row_tokens}, max_wait_ms {cfg.max_wait_ms:g}, prefix sharing {'on' if cfg.share_prefixes else 'off'}, "
            f"packing {'on' if cfg.pack_rows else 'off'}, plain rows {cfg.plain_rows}"
        )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        result: ScoreResult = await self.engine.score(request)
        return result

    async def counters(self) -> BatchCounters | None:
        s = self.engine.stats
        return BatchCounters(s.batches, s.tokens_submitted, s.tokens_used, s.tokens_computed)

    async def forget(self) -> None:
        if self.engine.cache is not None:
            self.engine.cache.clear()

    @property
    def max_batch_tokens(self) -> int | None:
        return int(self.engine.config.max_batch_tokens)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            self._engine = None


# --- a gRPC server ---------------------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}, labels as the server wrote them."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:  # label values may hold spaces: split after the closing brace
            end = line.rindex("}") + 1
            key, rest = line[:end], line[end:]
        else:
            key, _, rest = line.partition(" ")
        fields = rest.split()
        if fields:
            with contextlib.suppress(ValueError):
                out[key] = float(fields[0])
    return out


def counters_from_metrics(metrics: dict[str, float]) -> BatchCounters | None:
    """The server's batch counters from its metrics (stepscore.runtime.service.metrics names them)."""
    batches = metrics.get("stepscore_batch_tokens_count")
    if batches is None:
        return None
    return BatchCounters(
        batches=int(batches),
        tokens_submitted=int(metrics.get('stepscore_tokens_total{kind="submitted"}', 0)),
        tokens_used=int(metrics.get('stepscore_tokens_total{kind="used"}', 0)),
        tokens_computed=int(metrics.get('stepscore_tokens_total{kind="computed"}', 0)),
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_READY = re.compile(r"ready on (\S+):(\d+)\s*$")


class LocalServer:
    """`stepscore serve BUNDLE --port 0` as a child process: started until its ready line, SIGTERMed at the end."""

    def __init__(self, bundle: str | Path, args: Sequence[str] = (), metrics: bool = True, timeout: float = 120.0) -> None:
        self.bundle = Path(bundle)
        self.args = list(args)
        self.metrics_port = _free_port() if metrics else 0
        self.timeout = timeout
        self.target = ""
        self.output: list[str] = []
        self.returncode: int | None = None  # once stopped
        self._proc: subprocess.Popen[str] | None = None

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    @property
    def pid(self) -> int | None:
        """The server's process id once started (it stays the same when the server re-executes itself)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> str:
        """Start the server; returns HOST:PORT once it prints its ready line."""
        cmd = [sys.executable, "-m", "stepscore.cli", "serve", str(self.bundle), "--port", "0", *self.args]
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                if proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            match = _READY.search(line)
            if match:
                self.target = f"{match.group(1)}:{match.group(2)}"
                # keep reading its output, or the server would block on a full pipe
                threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()
                return self.target
        self.stop()
        raise StepscoreError("the benchmark's server did not start:\n" + "".join(self.output[-30:]))

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.output.append(line)

    def stop(self, timeout: float = 60.0) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: it drains and exits 0
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self.returncode = proc.returncode
        return proc.returncode


class ServiceSystem:
    """A gRPC server, driven through `stepscore.runtime.client.AsyncClient` (one unary Score per request).

    Batch counters come from its Prometheus endpoint when `metrics_url` is given; otherwise they are n/a.
    """

    sequential = False

    def __init__(
        self,
        target: str,
        metrics_url: str | None = None,
        token: str | None = None,
        name: str = "service",
        server: LocalServer | None = None,
        affinity: bool | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.metrics_url = metrics_url
        self._token = token
        self._server = server
        self._client: Any = None
        self._max_batch_tokens: int | None = None
        self.description = ""
        # Several replicas (a target naming several servers): with `affinity`, the client's ring_hash keeps
        # each search on one replica; without, round_robin spreads the calls in turn, as a balancer that knows
        # nothing of searches does. Either way every request carries a search id (see `score`).
        self.affinity = affinity
        self.replica_calls: Counter[str] = Counter()
        self.search_replicas: dict[str, set[str]] = defaultdict(set)
        self._searches: set[str] = set()  # search ids sent since the last forget()
        self._cannot_forget = ""

    @property
    def server(self) -> LocalServer | None:
        """The server this system started, if it started one."""
        return self._server

    @classmethod
    def spawn(
        cls, bundle: str | Path, serve_args: Sequence[str] = (), token: str | None = None, name: str = "service"
    ) -> ServiceSystem:
        """A system that starts `stepscore serve BUNDLE` itself at setup and stops it at close. `token`: the
        bearer token the server will require (it reads STEPSCORE_TOKEN from the environment it inherits)."""
        server = LocalServer(bundle, serve_args)
        return cls("", server.metrics_url, token=token, name=name, server=server)

    async def setup(self) -> None:
        from stepscore.runtime.client import AsyncClient, Client

        if self._server is not None:
            self.target = await _in_thread(self._server.start)

        def probe() -> int:
            with Client(self.target, token=self._token, timeout=30.0) as client:
                client.wait_ready(60.0)
                return int(client.info()["max_batch_tokens"])

        self._max_batch_tokens = await _in_thread(probe)
        balancing = "round_robin" if self.affinity is False else "ring_hash"
        self._client = AsyncClient(self.target, token=self._token, balancing=balancing)
        started = " started by the benchmark" if self._server is not None else ""
        metrics = f", metrics {self.metrics_url}" if self.metrics_url else ", no metrics (batch figures n/a)"
        self.description = f"gRPC server{started} at {self.target}, unary Score per request{metrics}"

    async def score(self, request: ScoreRequest) -> ScoreResult:
        if self._client is None:
            raise StepscoreError(f"{self.name}: setup() was not called")
        # A call without a search id leaves anonymous prefix-cache entries, which no EndSearch frees: the bench
        # names one (its problem's) so that forget() can empty the servers' caches between points.
        search = request.search_id or "bench-" + hashlib.sha256(request.problem.encode()).hexdigest()[:16]
        request = dataclasses.replace(request, search_id=search)
        self._searches.add(search)
        result: ScoreResult = await self._client.score(request)
        if self.affinity is not None:
            self.replica_calls[result.replica] += 1
            self.search_replicas[search].add(result.replica)
        return result

    async def forget(self) -> None:
        """End every search sent since the last call, on every replica (with round_robin any of them may hold
        a search's entries), which frees what they left in the prefix caches. A `dns:///` target cannot be
        enumerated: its searches are ended through the balanced channel, which reaches the search's replica
        under ring_hash only."""
        from stepscore.runtime.client import AsyncClient

        if not self._searches or self._client is None:
            return
        searches, self._searches = sorted(self._searches), set()
        scheme, _, rest = self.target.partition(":")
        addresses = rest.split(",") if scheme in ("ipv4", "ipv6") else [self.target]
        try:
            for address in addresses:
                async with AsyncClient(address, token=self._token, retry=False) as client:
                    await asyncio.gather(*(client.end_search(s) for s in searches))
        except StepscoreError as exc:
            if not self._cannot_forget:  # once: the same reason would repeat at every point
                self._cannot_forget = f"could not empty the prefix cache between points ({exc})"
                log.warning("%s: %s: later points may be answered from earlier ones", self.name, self._cannot_forget)
                self.description += f"; {self._cannot_forget}"

    def routing(self) -> str:
        """Where the calls went, for the report: calls per replica, and the share of searches (problems) whose
        every call reached one replica (what a per-replica prefix cache needs)."""
        total = sum(self.replica_calls.values())
        if not total:
            return ""
        shares = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in sorted(self.replica_calls.items()))
        kept = sum(1 for where in self.search_replicas.values() if len(where) == 1)
        searches = len(self.search_replicas)
        return (
            f"{'ring_hash on the search id' if self.affinity else 'round_robin (search ids ignored)'}: {total} calls, "
            f"per replica {shares}; searches on one replica {kept}/{searches} ({100 * kept / searches:.0f}%)"
        )

    async def counters(self) -> BatchCounters | None:
        if not self.metrics_url:
            return None
        url = self.metrics_url

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body: bytes = resp.read()
                return body.decode("utf-8")

        try:
            text = await _in_thread(scrape)
        except OSError as exc:
            log.warning("cannot scrape %s: %s", url, exc)
            return None
        return counters_from_metrics(parse_prometheus(text))

    @property
    def max_batch_tokens(self) -> int | None:
        return self._max_batch_tokens

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._server is not None:
            await _in_thread(self._server.stop)


# --- baselines ---------------------------------------------------------------------------------------


class _Sequential(abc.ABC):
    """One request at a time on one worker thread; waiting for the lock is the request's queue time."""

    sequential = True
    name: str

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepscore-bench")
        self._counters = BatchCounters()
        self._formatter: Formatter | None = None
        self.description = ""

    def _count(self, submitted: int, used: int, computed: int) -> None:
        c = self._counters
        self._counters = BatchCounters(
            c.batches + 1, c.tokens_submitted + submitted, c.tokens_used + used, c.tokens_computed + computed
        )

    @abc.abstractmethod
    def _run(self, items: Sequence[Formatted]) -> list[npt.NDArray[np.float32]]:
        """Step scores of one request's candidates (on the worker thread)."""

    async def score(self, request: ScoreRequest) -> ScoreResult:
        from stepscore.runtime.engine import build_result, validate_request

        if self._formatter is None or self._lock is None:
            raise StepscoreError(f"{self.name}: setup() was not called")
        formatter = self._formatter
        validate_request(request)
        started = time.perf_counter()
        async with self._lock:
            queued = time.perf_counter()
            loop = asyncio.get_running_loop()
            items = await loop.run_in_executor(self._pool, formatter.format_request, request)
            formatted = time.perf_counter()
            scores = await loop.run_in_executor(self._pool, self._run, items)
            done = time.perf_counter()
        timing = Timing(
            queue_ms=(queued - started) * 1000.0,
            tokenize_ms=(formatted - queued) * 1000.0,
            compute_ms=(done - formatted) * 1000.0,
            total_ms=(done - started) * 1000.0,
        )
        return build_result(items, scores, request, timing)

    async def counters(self) -> BatchCounters | None:
        return self._counters

    async def forget(self) -> None:
        """Nothing to forget: a baseline scores every call from scratch."""
        return None  # a body, not an abstract stub: the baselines have nothing to override

    @property
    def max_batch_tokens(self) -> int | None:
        return None  # no token budget: a request's batch is whatever its candidates make

    async def close(self) -> None:
        self._pool.shutdown(wait=True)


def _formatter(bundle: Bundle) -> Formatter:
    m = bundle.manifest
    return Formatter(m.format, bundle.tokenizer_path, m.model.vocab_size, m.model.max_seq_len)


class NaiveOrtSystem(_Sequential):
    """The bundle's ONNX graph without the engine: per request, its candidates padded into one batch
    (no prefix sharing, no row packing), run, then the next request.

    A request larger than `max_batch_tokens` (rows x row length) runs as several such batches, as a
    naive loop capped for memory would; nothing else is batched.
    """

    def __init__(
        self, bundle: str | Path, device: str = "cpu", threads: int = 0, max_batch_tokens: int = 16384, name: str = "naive-ort"
    ) -> None:
        super().__init__()
        self.name = name
        self._bundle_path = Path(bundle)
        self._device = device
        self._threads = threads
        self._budget = max_batch_tokens
        self._options = PackOptions(share_prefixes=False, pack_rows=False)
        self._backend: Any = None

    async def setup(self) -> None:
        from stepscore.runtime.backend import OrtBackend

        def load() -> None:
            bundle = load_bundle(self._bundle_path)
            self._formatter = _formatter(bundle)
            self._backend = OrtBackend(bundle.graph_path, self._device, threads=self._threads or None)
            self._backend.warmup()
            import onnxruntime

            self.description = (
                f"onnxruntime {onnxruntime.__version__} on {self._device}, {bundle.manifest.graph.precision}, one request "
                f"at a time, its candidates padded into one batch (at most {self._budget} tokens), no scheduler"
            )

        await _in_thread(load)
        self._lock = asyncio.Lock()

    def _run(self, items: Sequence[Formatted]) -> list[npt.NDArray[np.float32]]:
        scores: list[npt.NDArray[np.float32] | None] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            batch = pack([items[i] for i in pending], self._options, self._budget)
            flat = self._backend.run(batch).reshape(-1)
            self._count(batch.tokens_submitted, batch.tokens_used, batch.tokens_computed)
            left = set(batch.leftover)
            for k, i in enumerate(pending):
                if k not in left:
                    scores[i] = flat[batch.item_reads[k]]
            pending = [pending[k] for k in batch.leftover]
        return [s for s in scores if s is not None]


def head_layers(weights: Any, head: HeadSpec) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]]:
    """The head's layers ([in, out] matrix, bias) read from a checkpoint, as export reads them
    (stepscore.export.families `head_for`), driven by the bundle's head spec so both score the same way."""

    def linear(name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        bias = weights.get(f"{name}.bias") if f"{name}.bias" in weights else None
        return weights.get(f"{name}.weight").T.copy(), bias

    if head.family == "token_cls":
        if "score.0.weight" in weights:  # Qwen2ForProcessRewardModel: Linear-ReLU-Linear
            return [linear("score.0"), linear("score.2")]
        return [linear("score")]
    if head.family == "lm_pair":
        if head.candidate_ids is None:
            raise ConfigError("the bundle's lm_pair head names no candidate tokens")
        name = "lm_head.weight"
        if name not in weights:
            prefix = next((n[: -len("embed_tokens.weight")] for n in weights.names() if n.endswith("embed_tokens.weight")), "")
            name = f"{prefix}embed_tokens.weight"  # tied embeddings
        rows = weights.get(name)[list(head.candidate_ids)]
        return [(rows.T.copy(), None)]
    if head.family == "value_head":
        names = [n[: -len(".weight")] for n in weights.names() if n.endswith("v_head.summary.weight")]
        if not names:
            raise ConfigError("the model has no v_head.summary.weight")
        return [linear(names[0])]
    return [linear("score")]  # seq_cls


class HfEagerSystem(_Sequential):
    """Hugging Face transformers, PyTorch eager: each request's candidates in padded batches of
    `batch_size` (8, as search-and-learn's PRM wrappers), in request order, right-padded with an attention
    mask; scores read at the same positions the bundle reads, through the same head.

    The body is transformers' own model class loaded as the export gate loads it (stepscore.export.reference);
    the ids come from the bundle's formatter, so the HF model folder must be the one the bundle was
    exported from (or one of the same architecture and tokenizer).
    """

    def __init__(
        self,
        model_dir: str | Path,
        bundle: str | Path,
        device: str = "cpu",
        batch_size: int = 8,
        dtype: str = "auto",
        threads: int = 0,
        name: str = "hf-eager",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"the HF batch size must be at least 1, got {batch_size}")
        if dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"--hf-dtype {dtype!r} is not auto, fp32, fp16 or bf16")
        self.name = name
        self._model_dir = Path(model_dir)
        self._bundle_path = Path(bundle)
        self._device = device
        self._batch_size = batch_size
        self._dtype = dtype
        self._threads = threads
        self._body: Any = None
        self._head: list[tuple[Any, Any]] = []
        self._rule = ""
        self._torch: Any = None

    async def setup(self) -> None:
        await _in_thread(self._load)
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise ConfigError("the HF baseline needs torch and transformers: pip install 'stepscore[export]'") from exc
        from stepscore.export.families import read_config
        from stepscore.export.graph import HeadWeights
        from stepscore.export.reference import Reference
        from stepscore.export.weights import WeightStore

        bundle = load_bundle(self._bundle_path, verify=False)
        m = bundle.manifest
        config = read_config(self._model_dir)
        for key, want in (("hidden_size", m.model.hidden_size), ("num_hidden_layers", m.model.num_layers)):
            if int(config.get(key, -1)) != want:
                raise ConfigError(
                    f"{self._model_dir}: {key} {config.get(key)} differs from the bundle's {want}; "
                    "pass the model the bundle was exported from"
                )
        digest = hashlib.sha256((self._model_dir / "config.json").read_bytes()).hexdigest()
        if digest != m.source.get("config_sha256"):
            log.warning("%s: config.json differs from the one %s was exported from", self._model_dir, self._bundle_path)
        self._formatter = _formatter(bundle)
        layers = head_layers(WeightStore(self._model_dir), m.head)
        if self._threads:
            # the same thread count as the onnxruntime systems, for a like-for-like comparison
            torch.set_num_threads(self._threads)
        import transformers

        hf_logging: Any = transformers.logging  # partly typed: treat as Any, as stepscore.export.reference does
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a loading bar would break the one-line-per-point output
        try:
            reference = Reference(self._model_dir, HeadWeights(m.head, tuple(layers)))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(self._dtype)
        if dtype is None:  # auto: what the bundle computes in, where the device can
            dtype = torch.float16 if m.graph.precision == "fp16" and self._device.startswith("cuda") else torch.float32
        self._body = reference.body.to(device=self._device, dtype=dtype)
        self._head = [
            (torch.as_tensor(w, device=self._device), None if b is None else torch.as_tensor(b, device=self._device))
            for w, b in layers
        ]
        self._rule = m.head.score
        self._torch = torch
        attention = getattr(self._body.config, "_attn_implementation", "default")
        self.description = (
            f"{reference.description.split(' fp32')[0]} (PyTorch {torch.__version__}, {attention} attention) on "
            f"{self._device}, {str(dtype).removeprefix('torch.')}, one request at a time, padded batches of {self._batch_size}"
        )

    def _run(self, items: Sequence[Formatted]) -> list[npt.NDArray[np.float32]]:
        torch = self._torch
        out: list[npt.NDArray[np.float32]] = []
        with torch.inference_mode():
            for start in range(0, len(items), self._batch_size):
                chunk = items[start : start + self._batch_size]
                seq = max(it.num_tokens for it in chunk)
                ids = np.zeros((len(chunk), seq), dtype=np.int64)
                mask = np.zeros((len(chunk), seq), dtype=np.int64)
                for r, it in enumerate(chunk):
                    ids[r, : it.num_tokens] = it.ids
                    mask[r, : it.num_tokens] = 1
                hidden = self._body(
                    input_ids=torch.as_tensor(ids, device=self._device),
                    attention_mask=torch.as_tensor(mask, device=self._device),
                ).last_hidden_state
                rows = np.concatenate([np.full(it.reads.shape[0], r) for r, it in enumerate(chunk)])
                cols = np.concatenate([it.reads for it in chunk])
                x = hidden[torch.as_tensor(rows, device=self._device), torch.as_tensor(cols, device=self._device)].float()
                flat = self._score(x).cpu().numpy().astype(np.float32)  # .cpu() waits for the device
                at = 0
                for it in chunk:
                    out.append(flat[at : at + it.reads.shape[0]])
                    at += it.reads.shape[0]
                used = sum(it.num_tokens for it in chunk)
                self._count(used, used, len(chunk) * seq)
        return out

    def _score(self, x: Any) -> Any:
        torch = self._torch
        for i, (w, b) in enumerate(self._head):
            x = x @ w
            if b is not None:
                x = x + b
            if i < len(self._head) - 1:
                x = torch.relu(x)
        if self._rule == "softmax1":
            return torch.softmax(x, dim=-1)[:, 1]
        if self._rule == "pair_softmax0":
            return torch.softmax(x, dim=-1)[:, 0]
        if self._rule == "sigmoid":
            return torch.sigmoid(x[:, 0])
        return x[:, 0]

    async def close(self) -> None:
        await super().close()
        self._body = None
