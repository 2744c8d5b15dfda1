"""The engine's one configuration object, validated once at start-up.

Contradictory or impossible settings refuse to start with a message naming the setting; nothing is
silently adjusted mid-flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from stepscore.errors import ConfigError
from stepscore.runtime.bundle import Manifest
from stepscore.runtime.limits import RequestLimits
from stepscore.runtime.priority import MAX_NICE


def model_attention_cost(manifest: Manifest) -> float:
    """Per token and layer, attention costs ~4 * S * (heads x head_dim) FLOPs over a row of S tokens, the
    rest of the layer ~2 * its parameters: their ratio per unit of S."""
    m = manifest.model
    per_layer = max(1, (m.num_parameters - m.vocab_size * m.hidden_size) // max(1, m.num_layers))
    return 2.0 * m.num_heads * m.head_dim / per_layer


PlainRows = Literal["auto", "always", "never"]
PLAIN_ROWS: tuple[PlainRows, ...] = ("auto", "always", "never")


def default_plain_cost(device: str) -> float:
    """A plain-row token's cost relative to a tree-row token, before it is measured on the card.

    On the CPU EP the plain graph ran the same padded batches 8-19% faster than the tree graph (the bias
    add and the K/V head repeat are gone; benchmarks/RESULTS.md, section plain): 0.9. On CUDA its
    GroupQueryAttention runs flash attention where MultiHeadAttention with a bias cannot; 0.75 is an
    expectation to be replaced by the GPU script's measurement (benchmarks/gpu/NOTES.md).
    """
    return 0.75 if device.startswith("cuda") else 0.9


def default_run_overhead(device: str) -> float | None:
    """A run's fixed cost in tokens, for splitting mixed-length batches into length classes (packing).

    CPU: about 13 tokens' worth (an 8-layer, hidden-384 model: 0.9 ms per run, 67 us per token;
    benchmarks/RESULTS.md), so 16. CUDA: off until measured, since a run's launch cost there is worth far
    more tokens and one large batch is the safe default.
    """
    return None if device.startswith("cuda") else 16.0


def default_max_batch_tokens(device: str) -> int:
    """Tokens per engine run when the config leaves it to the device (-1).

    CPU: 2048. A run of that size already keeps the cores' matrix kernels busy; larger runs only add padding
    and run a little slower per token (benchmarks/RESULTS.md, runtime section: with 16,384, Best-of-N of 3
    unrelated solutions fell from 6,715 tokens/s at one caller to 5,429 at 16). CUDA: 16,384, so that one run
    fills the card.
    """
    return 16384 if device.startswith("cuda") else 2048


def default_cache_bytes() -> int:
    """The prefix cache's budget when none is given: an eighth of the memory available at start-up (Linux
    MemAvailable), at least 64 MiB; 1 GiB where the available memory cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(64 << 20, int(line.split()[1]) * 1024 // 8)
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    # tokens per engine run: rows x row length, padding included; -1 = the device's default (default_max_batch_tokens)
    max_batch_tokens: int = -1
    max_wait_ms: float = 1.0  # an idle device waits at most this long for a batch to fill
    max_queued_requests: int = 4096  # admitted and unfinished requests; more is "overloaded"
    max_queued_tokens: int = 2_000_000  # tokens of admitted and unfinished requests
    row_tokens: int = 2048  # target row length for packing; longer candidates get their own row
    row_multiple: int = 16  # row lengths are rounded up to a multiple of this (fewer distinct shapes)
    share_prefixes: bool = True  # compute shared token prefixes once (tree rows)
    pack_rows: bool = True  # several sequences per row instead of one padded row each
    min_shared_tokens: int = 8  # shorter common prefixes are not worth tying candidates together
    # attention's cost per token and unit of row length relative to the rest of a layer (see packing);
    # -1 = derive it from the model's shape (2 * query width / parameters per layer)
    attention_cost: float = -1.0
    # rows without a tree through the bundle's plain-row graph (no attention bias): "auto" when the cost
    # model says it is cheaper, "always" for every batch (no sharing, no packing), "never" (not loaded)
    plain_rows: PlainRows = "auto"
    plain_cost: float = -1.0  # a plain token's cost relative to a tree token; -1 = the device's default
    # a run's fixed cost in tokens: mixed-length batches run one length class at a time when that saves
    # more than it costs; -1 = the device's default (default_run_overhead), 0 = always one run per batch
    run_overhead_tokens: float = -1.0
    # time a few shapes at start-up and derive attention_cost, plain_cost and run_overhead_tokens (those left
    # at -1) from the fit (stepscore.runtime.costmodel); cached in the bundle folder when writable
    measure_cost: bool = True
    tokenizer_threads: int = 2  # threads formatting requests (the Rust tokenizer parallelises inside too)
    intra_op_threads: int = 0  # onnxruntime threads per session; 0 = onnxruntime's default
    # niceness of the engine's compute threads (onnxruntime's, tokenizing, packing) on Linux, so that the
    # thread answering calls gets a core first (stepscore.runtime.priority); 0 = the process's own. Off by
    # default: on a host shared with other busy processes, lowered compute yields to all of them too
    compute_nice: int = 0
    io_binding: bool | None = None  # None = on for CUDA, off for CPU
    max_seq_len: int = 0  # 0 = the bundle's limit; lower it to refuse longer candidates
    verify_bundle: bool = True  # sha256 every bundle file at load
    # request sizes refused before any tokenization (stepscore.runtime.limits), reported by Info
    limits: RequestLimits = field(default_factory=RequestLimits)
    # memory the tokenization cache may hold (texts, their ids and offsets); least recently used runs go first
    text_cache_bytes: int = 64 << 20
    # memory the prefix cache may hold (K/V and scores of earlier calls' steps, stepscore.runtime.prefixcache);
    # -1 = default_cache_bytes(), 0 = no prefix cache
    cache_bytes: int = -1

    def checked(self, manifest: Manifest, device: str = "cpu") -> EngineConfig:
        """Validate against the bundle; returns the config with defaults resolved (`device`: the first
        device the engine runs on, for the device defaults)."""
        if self.max_batch_tokens == -1:
            return replace(self, max_batch_tokens=default_max_batch_tokens(device)).checked(manifest, device)
        positive = (
            "max_batch_tokens",
            "max_queued_requests",
            "max_queued_tokens",
            "row_tokens",
            "row_multiple",
            "tokenizer_threads",
            "text_cache_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        self.limits.checked()
        if self.plain_rows not in PLAIN_ROWS:
            raise ConfigError(f"plain_rows must be one of {PLAIN_ROWS}, got {self.plain_rows!r}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.cache_bytes < -1:
            raise ConfigError(f"cache_bytes must be >= 0 (0: no prefix cache) or -1 (default), got {self.cache_bytes}")
        if not 0 <= self.compute_nice <= MAX_NICE:
            raise ConfigError(f"compute_nice must be between 0 and {MAX_NICE}, got {self.compute_nice}")
        if self.intra_op_threads < 0 or self.min_shared_tokens < 1:
            raise ConfigError("intra_op_threads must be >= 0 and min_shared_tokens >= 1")
        limit = manifest.model.max_seq_len
        max_seq_len = self.max_seq_len or limit
        if max_seq_len > limit:
            raise ConfigError(f"max_seq_len {max_seq_len} is beyond the bundle's limit of {limit} tokens")
        if self.row_tokens > manifest.model.max_row_tokens:
            raise ConfigError(
                f"row_tokens {self.row_tokens} is beyond the graph's longest row ({manifest.model.max_row_tokens})"
            )
        if self.row_tokens > self.max_batch_tokens:
            raise ConfigError(
                f"row_tokens {self.row_tokens} > max_batch_tokens {self.max_batch_tokens}: one row would not fit "
                "a batch; lower row_tokens or raise max_batch_tokens"
            )
        if self.max_queued_tokens < self.max_batch_tokens:
            raise ConfigError(
                f"max_queued_tokens {self.max_queued_tokens} < max_batch_tokens {self.max_batch_tokens}: "
                "batches could never fill"
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["max_seq_len"] = max_seq_len
        if self.attention_cost < 0:
            values["attention_cost"] = model_attention_cost(manifest)
        if self.cache_bytes < 0:
            values["cache_bytes"] = default_cache_bytes()
        return EngineConfig(**values)
