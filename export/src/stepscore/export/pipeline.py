"""`stepscore export MODEL OUT` in the four stages it prints: [1/4] load (config, tokenizer, weights index;
the plan), [2/4] export (the tree graph and its plain-row variant), [3/4] structure (the fused ops are there,
once per layer), [4/4] validate (against the PyTorch reference); then the manifest and the move into place.

The bundle is written into a temporary sibling directory and moved into place only after validation
passed, so OUT never holds a half-written or unvalidated bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stepscore.errors import ExportError
from stepscore.export.cached import derive_cached_graph, derive_cached_graph_gqa
from stepscore.export.families import MAX_ROW_TOKENS, ModelPlan, plan_export, rope_cache
from stepscore.export.graph import DecoderSpec, build_graph, fused_op_counts
from stepscore.export.plain import derive_plain_graph
from stepscore.export.presets import ExportOptions
from stepscore.export.reference import Reference
from stepscore.export.samples import SAMPLE_CHAINS
from stepscore.export.tokenizer import load_tokenizer
from stepscore.export.validate import ValidationReport, require_pass, validate_graph
from stepscore.export.weights import WeightStore
from stepscore.runtime.bundle import (
    MANIFEST_NAME,
    FileEntry,
    GraphSpec,
    Manifest,
    ModelSpec,
    Precision,
    hash_files,
    write_manifest,
)
from stepscore.runtime.formatting import Formatter
from stepscore.runtime.types import ScoreRequest

Progress = Callable[[str], None]

# Ops a decoder layer must have been built from; the structure check counts them per layer.
PLAIN_GRAPH = "model_plain.onnx"
CACHED_GRAPH = "model_cached.onnx"
# onnxruntime's CPU GroupQueryAttention refuses other head sizes ("head_size shall be a multiple of 16"); the
# families this targets have 64 or 128
GQA_HEAD_MULTIPLE = 16
FUSED_PER_LAYER = ("MultiHeadAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    seconds: float
    peak_rss_mb: float


def resolve_model(model: str) -> Path:
    """A local folder, or a Hugging Face hub id downloaded once (needs network)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ExportError(f"{model} is a file; pass the model's folder")
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ExportError(f"{model}: no such folder (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "pytorch_model*.bin"],
            )
        )
    except Exception as exc:
        raise ExportError(f"{model}: not a local folder and could not be downloaded from the hub ({exc})") from exc


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sha256_text(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the destination ---------------------------------------------------------------------------


def is_bundle(folder: Path) -> bool:
    """A folder `stepscore export` wrote: its manifest.json reads as one (a schema version and a graph)."""
    try:
        obj = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and "schema_version" in obj and isinstance(obj.get("graph"), dict)


def check_destination(out: Path, force: bool) -> None:
    """OUT must be a new or empty folder, or (with --force) a bundle: --force never deletes anything else."""
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ExportError(f"{folder} is a file, not a folder: give the bundle a folder path")
    if not out.is_dir():
        return
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise ExportError(f"{out}: cannot read the folder ({exc.strerror})") from exc
    if empty:
        return
    if not is_bundle(out):
        raise ExportError(
            f"{out} exists and is not a stepscore bundle (no bundle manifest.json); refusing to replace it, even with "
            "--force: choose another folder"
        )
    if not force:
        raise ExportError(f"{out} holds a bundle; pass --force to replace it")


class _Terminated(BaseException):
    """SIGTERM during an export: unwinds like Ctrl-C (SIGINT) does, so the staging folder is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A private sibling folder of OUT to write the bundle into; removed if anything fails, on Ctrl-C
    (SIGINT) and on SIGTERM. `publish` moves it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the bundle into {out.parent}: {exc.strerror}") from exc

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    # signal handlers can only be installed from the main thread; elsewhere SIGTERM ends the process anyway
    handler = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if handler else None
    try:
        yield work
    except _Terminated as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(128 + exc.signum) from None  # the shell's convention for "killed by this signal"
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        where = exc.filename or work
        raise ExportError(f"{where}: {exc.strerror or exc} (writing the bundle into {out.parent})") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if handler:
            signal.signal(signal.SIGTERM, previous)


def publish(work: Path, out: Path) -> None:
    """Move the finished bundle into place; a bundle OUT already held (checked by check_destination) is
    set aside first and deleted only once the new one is there."""
    # mkdtemp made the directory private; a bundle is readable like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- export ---------------------------------------------------------------------------------------


def export_model(
    model: str,
    out: Path,
    options: ExportOptions | None = None,
    precision: Precision = "fp16",
    tokenizer: Path | None = None,
    force: bool = False,
    progress: Progress = print,
    validate: bool = True,
) -> ExportResult:
    """Export `model` into the bundle directory `out` (see the module docstring).

    `validate=False` exists for benchmark scripts that check parity on the GPU themselves; the manifest
    then says the gate was skipped. The CLI always validates.
    """
    options = options or ExportOptions()
    if precision not in ("fp16", "fp32"):
        raise ExportError(f"--precision {precision!r} is not fp16 or fp32")
    out = out.expanduser()
    check_destination(out, force)  # before any heavy work: a refusal costs nothing
    start = time.perf_counter()

    def stage(n: int, name: str, since: float) -> float:
        now = time.perf_counter()
        progress(f"[{n}/4] {name:<9} {now - since:6.1f}s   peak memory {_peak_rss_mb():,.0f} MB")
        return now

    # 1. load: read config, tokenizer, weights index; decide everything
    model_dir = resolve_model(model)
    options = options.with_hints(model_dir)
    tok = load_tokenizer(model_dir, tokenizer)
    weights = WeightStore(model_dir)
    plan = plan_export(model_dir, tok, weights, options)
    progress(
        f"        {plan.architecture} ({plan.model_type}, {plan.decoder.num_layers} layers, hidden "
        f"{plan.decoder.hidden_size}) -> preset {plan.preset}, family {plan.family}, {precision}"
    )
    progress(f"        format: {plan.format.description}")
    for note in plan.notes:
        progress(f"        {note}")
    for warning in plan.warnings:
        progress(f"        warning: {warning}")
    t = stage(1, "load", start)

    with staging(out) as work:
        # 2. export: the graph, written straight from the checkpoint
        shutil.copyfile(tok.json_path, work / "tokenizer.json")
        cos, sin = rope_cache(model_dir, max(plan.max_seq_len, MAX_ROW_TOKENS))
        prefix = plan.body_prefix
        graph_path, data_path, n_params = build_graph(
            plan.decoder,
            lambda name: weights.get(prefix + name),
            (cos, sin),
            plan.head_weights,
            precision,
            work,
        )
        weights.close()  # before validation loads the reference: keep one copy of the model at a time
        plain_path: Path | None = None
        if plan.decoder.head_dim % GQA_HEAD_MULTIPLE == 0:
            plain_path = derive_plain_graph(graph_path, work / PLAIN_GRAPH, plan.decoder.num_heads, plan.decoder.num_kv_heads)
        d = plan.decoder
        cached_op = "GroupQueryAttention" if d.head_dim % GQA_HEAD_MULTIPLE == 0 else "MultiHeadAttention"
        if cached_op == "GroupQueryAttention":  # grouped K/V as they are, each row reading its own past only
            cached_path = derive_cached_graph_gqa(graph_path, work / CACHED_GRAPH, d.num_heads, d.num_kv_heads)
        else:
            cached_path = derive_cached_graph(graph_path, work / CACHED_GRAPH, d.num_heads, d.num_kv_heads, d.head_dim)
        t = stage(2, "export", t)

        # 3. structure: the fused ops are there, once per layer
        ops = fused_op_counts(graph_path)
        layers = plan.decoder.num_layers
        # per layer: one attention, rotary on q and k, skip-norms after attention and before the next layer
        per_layer = {
            "MultiHeadAttention": layers,
            "RotaryEmbedding": 2 * layers,
            "SkipSimplifiedLayerNormalization": 2 * layers - 1,
        }
        for op, expected in per_layer.items():
            if ops.get(op, 0) < expected:
                raise ExportError(f"graph has {ops.get(op, 0)} {op} nodes, expected {expected}")
        progress("        " + ", ".join(f"{ops.get(op, 0)} {op}" for op in (*FUSED_PER_LAYER, "QuickGelu")))
        if plain_path is not None:
            gqa = fused_op_counts(plain_path).get("GroupQueryAttention", 0)
            if gqa != layers:
                raise ExportError(f"plain-row graph has {gqa} GroupQueryAttention nodes, expected {layers}")
            progress(f"        plain-row graph: {gqa} GroupQueryAttention")
        else:
            progress(
                f"        no plain-row graph: GroupQueryAttention needs a head size that is a multiple of "
                f"{GQA_HEAD_MULTIPLE} (this model's is {plan.decoder.head_dim}); every batch uses the tree graph"
            )
        got = fused_op_counts(cached_path).get(cached_op, 0)
        if got != layers:
            raise ExportError(f"cached graph has {got} {cached_op} nodes, expected {layers}")
        progress(f"        cached graph: {got} {cached_op}")
        t = stage(3, "structure", t)

        # 4. validate against the PyTorch reference, through the runtime's formatter and packer
        validation: dict[str, object] = {"skipped": True, "passed": None}
        if validate:
            report = _validate(model_dir, plan, work, (graph_path, plain_path, cached_path), precision)
            plain_diff = f", plain rows {report.max_abs_diff_plain:.2e}" if report.max_abs_diff_plain is not None else ""
            progress(
                f"        max |graph - reference| = {report.max_abs_diff:.2e} (alone {report.max_abs_diff_alone:.2e}, "
                f"packed {report.max_abs_diff_packed:.2e}{plain_diff}) over {report.num_steps} steps; "
                f"tolerance {report.tolerance:g}; scored in increments through the prefix cache vs at once: "
                f"{report.max_abs_diff_incremental:.2e} (tolerance {report.incremental_tolerance:g})"
            )
            require_pass(report)
            validation = report.as_dict()
        t = stage(4, "validate" if validate else "(skipped)", t)

        files = ["tokenizer.json", graph_path.name, cached_path.name]
        files += [p.name for p in (plain_path, data_path) if p is not None]
        graphs = (graph_path, plain_path, cached_path, data_path)
        manifest = _manifest(
            model, model_dir, plan, precision, graphs, n_params, ops, validation, hash_files(work, files), cached_op
        )
        write_manifest(work, manifest)
        publish(work, out)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    progress(f"wrote {out} in {seconds:.1f}s, peak memory {peak:,.0f} MB")
    return ExportResult(out, manifest, seconds, peak)


def _validate(
    model_dir: Path, plan: ModelPlan, work: Path, graphs: tuple[Path, Path | None, Path], precision: Precision
) -> ValidationReport:
    formatter = Formatter(plan.format, work / "tokenizer.json", plan.decoder.vocab_size, plan.max_seq_len)
    items = [
        item
        for problem, candidates in SAMPLE_CHAINS
        for item in formatter.format_request(ScoreRequest(problem, candidates, truncate_left=True))
    ]
    reference = Reference(model_dir, plan.head_weights)
    want = reference.scores(items)
    name = reference.description
    reference.close()  # free the fp32 copy before onnxruntime loads the graph
    graph_path, plain_path, cached_path = graphs
    d = plan.decoder
    cached = (cached_path, (d.num_layers, d.num_kv_heads, d.head_dim))
    return validate_graph(graph_path, items, want, precision, plan.head.score, name, plain_path, cached)


def _manifest(
    model: str,
    model_dir: Path,
    plan: ModelPlan,
    precision: Precision,
    graphs: tuple[Path, Path | None, Path, Path | None],  # tree graph, plain-row graph, cached graph, external data
    n_params: int,
    ops: dict[str, int],
    validation: dict[str, object],
    files: dict[str, FileEntry],
    cached_attention: str,  # the cached graph's attention op (checked in the structure stage)
) -> Manifest:
    d: DecoderSpec = plan.decoder
    graph_path, plain_path, cached_path, data_path = graphs
    from stepscore.export.graph import OPSET

    return Manifest(
        family=plan.family,
        preset=plan.preset,
        source={
            "model": model,
            "architecture": plan.architecture,
            "model_type": plan.model_type,
            "config_sha256": _sha256_text(model_dir / "config.json"),
        },
        model=ModelSpec(
            **d.dimensions(),
            architecture=plan.architecture,
            model_type=plan.model_type,
            max_seq_len=plan.max_seq_len,
            max_row_tokens=max(plan.max_seq_len, MAX_ROW_TOKENS),
            num_parameters=n_params,
        ),
        head=plan.head,
        format=plan.format,
        graph=GraphSpec(
            file=graph_path.name,
            data_file=data_path.name if data_path else None,
            precision=precision,
            opset=OPSET,
            fused_ops={
                k: v for k, v in sorted(ops.items()) if k in (*FUSED_PER_LAYER, "QuickGelu", "SimplifiedLayerNormalization")
            },
            plain_file=plain_path.name if plain_path else None,
            cached_file=cached_path.name,
            cached_attention=cached_attention,
        ),
        tokenizer_file="tokenizer.json",
        validation=validation,
        files=files,
    )
