"""The model backend: a narrow interface, and its onnxruntime implementation.

The scheduler only calls `run(batch) -> scores` on a worker thread and `warmup()` at start; everything
device-specific (execution provider, IO binding, buffer reuse) stays behind this seam.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from stepscore.errors import BundleError, ConfigError
from stepscore.runtime import allocator
from stepscore.runtime.bundle import INPUTS, OUTPUTS, PAST_LEN, PLAIN_INPUTS, cached_inputs, cached_outputs
from stepscore.runtime.packing import PackedBatch

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]
# The cached graph's K/V outputs for a batch: one [B, kv_heads, S, head_dim] array per layer and per K and V.
Present = list[npt.NDArray[Any]]


class Backend(Protocol):
    """What the scheduler needs from a device."""

    device: str
    plain_rows: bool  # runs plain-row batches (PackedBatch.seq_lens) through a plain graph

    def run(self, batch: PackedBatch) -> F32Array:
        """Scores [B, K] float32 for one packed batch. Called from one worker thread at a time."""
        ...

    def warmup(self) -> None: ...


@runtime_checkable
class KvBackend(Protocol):
    """A backend that also runs the cached graph (stepscore.export.cached), for the prefix cache."""

    kv_cache: bool  # the cached graph is loaded
    past_padded: bool  # its attention pays for the batch's longest past in every row (PackOptions.past_padded)

    def run_cached(self, batch: PackedBatch) -> tuple[F32Array, Present]:
        """Scores [B, K] and the new tokens' K/V, one [B, kv_heads, S, head_dim] array per layer and per K and
        V (present_key.0, present_value.0, present_key.1, ...), for a batch laid out by
        stepscore.runtime.cachedbatch.pack_cached."""
        ...


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("onnxruntime is not installed: pip install 'stepscore[cpu]' (or 'stepscore[gpu]' for CUDA)") from exc
    return onnxruntime


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' / 'cuda:1' -> ('cuda', 1)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if index and not index.isdigit():
        raise ConfigError(f"device {device!r}: the index after ':' must be a number")
    return kind, int(index or 0)


class MemoryRelease:
    """When a CPU run gives its memory back: at most once every `interval` seconds (see OrtBackend).

    A releasing run asks onnxruntime's arena to shrink at its end, then `trim` (glibc's malloc_trim) hands the
    C heap's free pages back to the system. Each release costs the next runs page faults for the memory they
    take again, so releases are spaced out in time: `due()` before a run says whether it releases, `released()`
    after it trims and restarts the interval.
    """

    def __init__(
        self,
        interval: float = 2.0,
        trim: Callable[[int], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.interval = interval
        self._trim = trim
        self._clock = clock
        self._last = -math.inf  # when the last release ended
        self.releases = 0

    def due(self) -> bool:
        return self._clock() - self._last >= self.interval

    def released(self) -> None:
        if self._trim is not None:
            self._trim(0)
        self._last = self._clock()
        self.releases += 1


class OrtBackend:
    """One onnxruntime session on one device.

    On CUDA the inputs go through IO binding into device buffers that are reused for every batch of
    the same shape (the scheduler rounds shapes up, so there are few), and the small [B, K] output is
    bound to host memory.

    With `plain_graph_path`, a second session holds the plain-row graph (stepscore.export.plain) and runs the
    batches the packer laid out one sequence per row; its weights are the same initializers (memory-mapped
    from the same external data file when the model has one).

    Memory on CPU: onnxruntime's CPU arena never gives memory back by default, and with the many distinct
    shapes the scheduler runs ([B, S] and, with the prefix cache, the past length P) it grew run after run; glibc
    then keeps what it frees. So on CPU a run every `release_interval` seconds (MemoryRelease) asks the arena to
    shrink at its end (run option memory.enable_memory_arena_shrinkage: regions left entirely free go back to
    malloc), then malloc_trim hands the C heap's free pages back to the system. Measured by replaying the
    batches of one step-by-step pass (49 runs, 1 thread) three times, RSS above the loaded backend: +550 MB
    before, +160 MB with a release every 2 s, at +1% time (17.2 s vs 17.0 s a pass); a release after every run
    left +145 MB but cost +7% (the next runs fault the memory in again); the arena off (+ the same trims)
    +165 MB at +6%. benchmarks/memory_probe.py measures the engine under the workload.
    """

    shrink_cpu_arena = True  # class attributes, so that benchmarks/memory_probe.py can turn them off
    trim_after_runs = True
    release_interval = 2.0  # seconds between two runs that give memory back (MemoryRelease)

    def __init__(
        self,
        graph_path: Path | None,
        device: str = "cpu",
        threads: int | None = None,
        io_binding: bool | None = None,
        plain_graph_path: Path | None = None,
        cached_graph_path: Path | None = None,
        kv_shape: tuple[int, int, int] | None = None,  # (layers, kv_heads, head_dim), with cached_graph_path
        cached_attention: str = "MultiHeadAttention",  # the cached graph's attention op (GraphSpec.cached_attention)
    ) -> None:
        ort = _import_ort()
        self._ort = ort
        kind, index = parse_device(device)
        self.device = device
        self._kind = kind
        self._index = index
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if kind == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(
                    f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                    f"(available: {ort.get_available_providers()}); pip install 'stepscore[gpu]'"
                )
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"device_id": index, "arena_extend_strategy": "kSameAsRequested"}),
                "CPUExecutionProvider",
            ]
        else:
            providers = ["CPUExecutionProvider"]
        # graph_path None: the plain-row graph alone (export's validation runs the graphs one at a time,
        # so that only one copy of the weights is in memory at once)
        self.session = self._session(graph_path, opts, providers, INPUTS) if graph_path else None
        if self.session is None and plain_graph_path is None and cached_graph_path is None:
            raise ConfigError("OrtBackend needs a graph")
        self.plain_session = self._session(plain_graph_path, opts, providers, PLAIN_INPUTS) if plain_graph_path else None
        self.plain_rows = self.plain_session is not None
        self.cached_session = None
        self.kv_cache = cached_graph_path is not None
        self.past_padded = cached_attention != "GroupQueryAttention"
        if cached_graph_path is not None:
            if kv_shape is None:
                raise ConfigError("the cached graph needs kv_shape (layers, kv_heads, head_dim)")
            self._kv_shape = kv_shape
            layers = kv_shape[0]
            self.cached_session = self._session(
                cached_graph_path, opts, providers, cached_inputs(layers), cached_outputs(layers)
            )
            past = self.cached_session.get_inputs()[len(INPUTS) + 1]
            self._kv_dtype = np.float16 if "float16" in past.type else np.float32
        self._io_binding = (kind == "cuda") if io_binding is None else io_binding
        # on CPU: the arena's free regions go back at the end of each run, then the C heap's free pages
        # (see the class docstring); on CUDA the arenas are left as they are
        self._shrink_options: Any = None  # the run options of a run that gives memory back (None: plain runs)
        if kind == "cpu" and self.shrink_cpu_arena:
            self._shrink_options = ort.RunOptions()
            self._shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        trim = allocator.malloc_trim() if kind == "cpu" and self.trim_after_runs else None
        self._release = (
            MemoryRelease(self.release_interval, trim) if self._shrink_options is not None or trim is not None else None
        )
        self._buffers: dict[tuple[str, tuple[int, ...]], Any] = {}
        self._lock = threading.Lock()

    def _session(
        self, path: Path, opts: Any, providers: list[Any], contract: tuple[str, ...], outputs: tuple[str, ...] = OUTPUTS
    ) -> Any:
        try:
            session = self._ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
            # e.g. external data whose path leaves the bundle: one line, never a traceback
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = reason.split(" : ")[-1]  # drop "[ONNXRuntimeError] : 1 : FAIL : "
            raise BundleError(f"{path.name}: onnxruntime refused the graph: {reason}") from None
        got = session.get_providers()
        if self._kind == "cuda" and got[0] != "CUDAExecutionProvider":
            raise ConfigError(f"onnxruntime could not start CUDA on {self.device!r} (providers: {got})")
        names = tuple(i.name for i in session.get_inputs())
        if names != contract:
            raise BundleError(f"{path.name}: graph inputs {names} are not the contract's {contract}")
        got_outputs = tuple(o.name for o in session.get_outputs())
        if got_outputs != outputs:
            raise BundleError(f"{path.name}: graph outputs {got_outputs} are not the contract's {outputs}")
        return session

    def run(self, batch: PackedBatch) -> F32Array:
        if self.session is None and self.cached_session is not None and batch.seq_lens is None:
            # the cached graph with an empty past computes what the tree graph does: with the prefix cache on,
            # it is the only session, so the weights are in memory once
            return self.run_cached(replace(batch, past_len=np.zeros(batch.shape[0], np.int64)))[0]
        feeds: dict[str, npt.NDArray[Any]]
        if batch.seq_lens is not None and self.plain_session is not None:
            session = self.plain_session
            feeds = {PLAIN_INPUTS[0]: batch.input_ids, PLAIN_INPUTS[1]: batch.seq_lens, PLAIN_INPUTS[2]: batch.step_positions}
        else:  # a plain batch is a valid tree batch too
            if self.session is None:
                raise ConfigError("this backend holds only the plain-row graph; the batch is not laid out for it")
            session = self.session
            feeds = {
                INPUTS[0]: batch.input_ids,
                INPUTS[1]: batch.position_ids,
                INPUTS[2]: batch.attn_end,
                INPUTS[3]: batch.step_positions,
            }
        with self._lock, self._run_options() as options:  # one run per session at a time (the scheduler's rule too)
            if not self._io_binding:
                out = session.run(list(OUTPUTS), feeds, options)[0]
                scores = np.asarray(out, dtype=np.float32)
                del out
            else:
                binding = session.io_binding()
                for name, array in feeds.items():
                    if self._kind == "cuda":
                        binding.bind_ortvalue_input(name, self._device_buffer(name, array))
                    else:
                        binding.bind_cpu_input(name, array)
                binding.bind_output(OUTPUTS[0], "cpu")
                session.run_with_iobinding(binding, options)
                scores = np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)
                del binding
            return scores

    def run_cached(self, batch: PackedBatch) -> tuple[F32Array, Present]:
        if self.cached_session is None:
            raise ConfigError("this backend has no cached graph (the bundle predates it, or the cache is off)")
        assert batch.past_len is not None
        layers, heads, dim = self._kv_shape
        b = batch.shape[0]
        past = batch.past_kv
        if past is None:
            past = np.zeros((layers, 2, b, heads, 0, dim), dtype=self._kv_dtype)
        feeds: dict[str, npt.NDArray[Any]] = {
            INPUTS[0]: batch.input_ids,
            INPUTS[1]: batch.position_ids,
            INPUTS[2]: batch.attn_end,
            INPUTS[3]: batch.step_positions,
            PAST_LEN: batch.past_len,
        }
        names = cached_inputs(layers)[len(INPUTS) + 1 :]
        for n, name in enumerate(names):
            feeds[name] = np.ascontiguousarray(past[n // 2, n % 2])
        with self._lock, self._run_options() as options:
            outs = self.cached_session.run(None, feeds, options)
            scores = np.asarray(outs[0], dtype=np.float32)
            # kept per layer, as onnxruntime returned them: stacking them would copy every token's K/V once more,
            # though the cache copies only the segments it does not hold (cachedbatch.suffix_kv)
            present: Present = outs[1:]
            del outs, feeds  # the past's copies: freed before the trim
        return scores, present

    @contextlib.contextmanager
    def _run_options(self) -> Iterator[Any]:
        """The run options of the next run: those that shrink the arena when a release is due (MemoryRelease),
        which then trims the heap once the run's own arrays are freed (the end of the with block)."""
        release = self._release if self._release is not None and self._release.due() else None
        yield self._shrink_options if release is not None else None
        if release is not None:
            release.released()

    def _device_buffer(self, name: str, array: npt.NDArray[Any]) -> Any:
        key = (name, tuple(array.shape))
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) > 256:  # many distinct shapes: keep memory bounded
                self._buffers.clear()
            buf = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self._index)
            self._buffers[key] = buf
        else:
            buf.update_inplace(np.ascontiguousarray(array))
        return buf

    def warmup(self) -> None:
        from stepscore.runtime.packing import PackOptions, pack
        from stepscore.runtime.types import Formatted

        ids = np.arange(1, 17, dtype=np.int32) % 7
        item = Formatted(ids, np.array([7, 15], np.int32))
        batches = [pack([item], PackOptions(row_tokens=16))] if self.session is not None else []
        if self.session is None and self.cached_session is not None:
            batches.append(pack([item], PackOptions(row_tokens=16)))  # through the cached graph
        if self.plain_session is not None:
            batches.append(pack([item], PackOptions(row_tokens=16, plain_cost=0.0)))
        for batch in batches:
            scores = self.run(batch)
            if scores.shape != batch.step_positions.shape:
                raise ConfigError(f"warm-up returned shape {scores.shape}, expected {batch.step_positions.shape}")
        if self.cached_session is not None:  # a batch continuing no cached prefix
            batch = pack([item], PackOptions(row_tokens=16))
            scores, _ = self.run_cached(replace(batch, past_len=np.zeros(batch.shape[0], np.int64)))
            if scores.shape != batch.step_positions.shape:
                raise ConfigError(f"cached graph warm-up returned shape {scores.shape}, expected {batch.step_positions.shape}")
        log.debug("warm-up on %s done (pid %d)", self.device, os.getpid())
