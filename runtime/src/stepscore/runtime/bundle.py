"""The bundle: an exported directory (graph, tokenizer, manifest.json) and its one schema.

Export writes bundles through `write_manifest`; the runtime reads them through `load_bundle`. Both sides
use the dataclasses below, so the manifest has exactly one definition. Loading verifies the schema
version and the size and sha256 of every file, so a tampered or truncated file is a `BundleError`,
never a wrong score.

The graph contract (input and output names, shapes and meaning) is documented in docs/graph-contract.md
and pinned here by `GRAPH_CONTRACT` and the `INPUTS` / `OUTPUTS` tuples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from stepscore.errors import BundleError
from stepscore.version import __version__

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Version of the graph's calling convention; bumped when inputs/outputs change meaning.
GRAPH_CONTRACT = 1
INPUTS = ("input_ids", "position_ids", "attn_end", "step_positions")
OUTPUTS = ("step_scores",)
# The plain-row graph (stepscore.export.plain): one sequence per row, right-padded, lengths instead of attn_end.
PLAIN_INPUTS = ("input_ids", "seq_lens", "step_positions")

Family = Literal["token_cls", "lm_pair", "value_head", "seq_cls"]
FAMILIES: tuple[Family, ...] = ("token_cls", "lm_pair", "value_head", "seq_cls")
Precision = Literal["fp16", "fp32"]
ScoreRule = Literal["softmax1", "pair_softmax0", "sigmoid", "identity"]


# --- format: how a problem and its steps become token ids ------------------------------------


@dataclass(frozen=True)
class Read:
    """Marks the segment whose last token (plus `offset`) is where a step's score is read.

    On a text or field segment that token is the one covering the segment's last character.

    `expect` is the token id that segment must tokenize to: a text marker that merged with the user's
    text into another token is a formatting error, never a silently moved step.
    """

    offset: int = 0
    expect: int | None = None


@dataclass(frozen=True)
class Segment:
    """One piece of the formatted input. Exactly one of the kinds is set.

    - `text`: trusted literal text (from the template); joins the current text run.
    - `field`: "problem" or "step": user text; joins the current text run, tokenized as plain text
      (special-token strings in it are never special).
    - `ids`: token ids inserted as ids (special tokens, tags); ends the current text run.
    - `brk`: ends the current text run (formats that tokenize each piece on its own).

    Text runs are tokenized as one string, as the model's reference code tokenizes its whole prompt;
    runs never cross an `ids` segment, matching how tokenizers split text at special tokens.
    """

    text: str | None = None
    field: Literal["problem", "step"] | None = None
    ids: tuple[int, ...] | None = None
    brk: bool = False
    read: Read | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.text is not None:
            out["text"] = self.text
        if self.field is not None:
            out["field"] = self.field
        if self.ids is not None:
            out["ids"] = list(self.ids)
        if self.brk:
            out["break"] = True
        if self.read is not None:
            out["read"] = {"offset": self.read.offset, "expect": self.read.expect}
        return out

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> Segment:
        read = obj.get("read")
        seg = Segment(
            text=obj.get("text"),
            field=obj.get("field"),
            ids=tuple(int(i) for i in obj["ids"]) if "ids" in obj else None,
            brk=bool(obj.get("break", False)),
            read=Read(int(read.get("offset", 0)), read.get("expect")) if read else None,
        )
        kinds = sum(x is not None for x in (seg.text, seg.field, seg.ids)) + int(seg.brk)
        if kinds != 1:
            raise BundleError(f"format segment {dict(obj)!r} must have exactly one of text/field/ids/break")
        if seg.field not in (None, "problem", "step"):
            raise BundleError(f"format segment field {seg.field!r} is not 'problem' or 'step'")
        if seg.read is not None and seg.brk:
            raise BundleError("a read marker cannot sit on a break")
        return seg


@dataclass(frozen=True)
class Strip:
    """Whitespace the reference template strips from user text (detected at export)."""

    left: bool = False
    right: bool = False

    def apply(self, s: str) -> str:
        if self.left:
            s = s.lstrip()
        if self.right:
            s = s.rstrip()
        return s


@dataclass(frozen=True)
class FormatSpec:
    """A candidate is `prompt + step(1) + separator + step(2) + ... + step(n)`.

    Each `step` unit holds the step's text field and exactly one read marker. Tokens after the last
    read marker cannot change any score (attention is causal) and are not computed. When `join_steps`
    is set (outcome models), the steps are joined into one response with it and scored once.
    """

    prompt: tuple[Segment, ...]
    step: tuple[Segment, ...]
    separator: tuple[Segment, ...] = ()
    strip_problem: Strip = Strip()
    strip_first_step: Strip = Strip()
    strip_step: Strip = Strip()
    join_steps: str | None = None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": [s.to_json() for s in self.prompt],
            "step": [s.to_json() for s in self.step],
            "separator": [s.to_json() for s in self.separator],
            "strip": {
                "problem": [self.strip_problem.left, self.strip_problem.right],
                "first_step": [self.strip_first_step.left, self.strip_first_step.right],
                "step": [self.strip_step.left, self.strip_step.right],
            },
            "join_steps": self.join_steps,
            "description": self.description,
        }

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> FormatSpec:
        strip = obj.get("strip", {})

        def _strip(key: str) -> Strip:
            left, right = strip.get(key, [False, False])
            return Strip(bool(left), bool(right))

        spec = FormatSpec(
            prompt=tuple(Segment.from_json(s) for s in obj["prompt"]),
            step=tuple(Segment.from_json(s) for s in obj["step"]),
            separator=tuple(Segment.from_json(s) for s in obj.get("separator", [])),
            strip_problem=_strip("problem"),
            strip_first_step=_strip("first_step"),
            strip_step=_strip("step"),
            join_steps=obj.get("join_steps"),
            description=str(obj.get("description", "")),
        )
        spec.check()
        return spec

    def check(self) -> None:
        reads = [s for s in self.step if s.read is not None]
        if len(reads) != 1:
            raise BundleError(f"the step unit must hold exactly one read marker, found {len(reads)}")
        if not any(s.field == "step" for s in self.step):
            raise BundleError("the step unit has no step field")
        if any(s.read is not None for s in self.prompt + self.separator):
            raise BundleError("read markers belong in the step unit only")
        if any(s.field == "step" for s in self.prompt + self.separator):
            raise BundleError("the step field belongs in the step unit only")


# --- the rest of the manifest ---------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """How the graph turns the hidden state at a read position into a score in [0, 1] (or a reward)."""

    family: Family
    score: ScoreRule
    num_labels: int
    candidate_ids: tuple[int, int] | None = None  # lm_pair: (good, bad) token ids
    tag_id: int | None = None  # the token a step's score is read at, when there is one


@dataclass(frozen=True)
class Dimensions:
    """A decoder's sizes: what export's graph builder needs and what the manifest records."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int

    def dimensions(self) -> dict[str, int]:
        """Only the sizes (of this object or of a subclass that adds more fields)."""
        return {f.name: getattr(self, f.name) for f in fields(Dimensions)}


@dataclass(frozen=True)
class ModelSpec(Dimensions):
    architecture: str
    model_type: str
    max_seq_len: int  # longest candidate the bundle scores (tokens)
    max_row_tokens: int  # longest packed row the graph accepts (its rotary cache covers it)
    num_parameters: int


@dataclass(frozen=True)
class GraphSpec:
    file: str
    data_file: str | None
    precision: Precision
    opset: int
    contract: int = GRAPH_CONTRACT
    inputs: tuple[str, ...] = INPUTS
    outputs: tuple[str, ...] = OUTPUTS
    fused_ops: Mapping[str, int] = field(default_factory=dict)
    # The plain-row variant (PLAIN_INPUTS; stepscore.export.plain), sharing `data_file`; None in bundles without it.
    plain_file: str | None = None


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    family: Family
    preset: str
    source: Mapping[str, Any]
    model: ModelSpec
    head: HeadSpec
    format: FormatSpec
    graph: GraphSpec
    tokenizer_file: str
    validation: Mapping[str, Any]
    files: Mapping[str, FileEntry]
    schema_version: int = SCHEMA_VERSION
    stepscore_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "stepscore_version": self.stepscore_version,
            "family": self.family,
            "preset": self.preset,
            "source": dict(self.source),
            "model": asdict(self.model),
            "head": {
                **asdict(self.head),
                "candidate_ids": list(self.head.candidate_ids) if self.head.candidate_ids else None,
            },
            "format": self.format.to_json(),
            "graph": {
                **asdict(self.graph),
                "inputs": list(self.graph.inputs),
                "outputs": list(self.graph.outputs),
                "fused_ops": dict(self.graph.fused_ops),
            },
            "tokenizer": {"file": self.tokenizer_file},
            "validation": dict(self.validation),
            "files": {name: asdict(entry) for name, entry in sorted(self.files.items())},
        }

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> Manifest:
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema_version {version!r} is not supported by stepscore {__version__} "
                f"(it reads version {SCHEMA_VERSION}); re-export the model with this version"
            )
        try:
            head = obj["head"]
            graph = obj["graph"]
            manifest = Manifest(
                schema_version=version,
                stepscore_version=str(obj["stepscore_version"]),
                family=obj["family"],
                preset=str(obj["preset"]),
                source=dict(obj["source"]),
                model=ModelSpec(**obj["model"]),
                head=HeadSpec(
                    family=head["family"],
                    score=head["score"],
                    num_labels=int(head["num_labels"]),
                    candidate_ids=tuple(head["candidate_ids"]) if head.get("candidate_ids") else None,
                    tag_id=head.get("tag_id"),
                ),
                format=FormatSpec.from_json(obj["format"]),
                graph=GraphSpec(
                    file=graph["file"],
                    data_file=graph.get("data_file"),
                    precision=graph["precision"],
                    opset=int(graph["opset"]),
                    contract=int(graph["contract"]),
                    inputs=tuple(graph["inputs"]),
                    outputs=tuple(graph["outputs"]),
                    fused_ops=dict(graph.get("fused_ops", {})),
                    plain_file=graph.get("plain_file"),
                ),
                tokenizer_file=obj["tokenizer"]["file"],
                validation=dict(obj.get("validation", {})),
                files={k: FileEntry(**v) for k, v in obj["files"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {exc!r}") from exc
        if manifest.family not in FAMILIES:
            raise BundleError(f"manifest family {manifest.family!r} is not one of {FAMILIES}")
        if manifest.graph.contract != GRAPH_CONTRACT or manifest.graph.inputs != INPUTS:
            raise BundleError(
                f"graph contract {manifest.graph.contract} with inputs {manifest.graph.inputs} is not "
                f"the contract {GRAPH_CONTRACT} {INPUTS} this runtime speaks; re-export the model"
            )
        return manifest


# --- reading and writing ---------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(directory: Path, names: Sequence[str]) -> dict[str, FileEntry]:
    return {name: FileEntry(sha256=sha256_file(directory / name), size=(directory / name).stat().st_size) for name in names}


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (a crash never leaves a half-written manifest)."""
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest.graph.file

    @property
    def plain_graph_path(self) -> Path | None:
        plain = self.manifest.graph.plain_file
        return self.path / plain if plain else None

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer_file


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read and check a bundle. `verify=False` skips the sha256 pass (sizes are always checked)."""
    directory = Path(path)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle directory (export one with `stepscore export MODEL OUT`)")
    if not manifest_path.is_file():
        raise BundleError(f"{directory}: no {MANIFEST_NAME}; is this a bundle written by `stepscore export`?")
    try:
        obj = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    manifest = Manifest.from_json(obj)
    needed = {manifest.graph.file, manifest.tokenizer_file}
    if manifest.graph.data_file:
        needed.add(manifest.graph.data_file)
    if manifest.graph.plain_file:
        needed.add(manifest.graph.plain_file)
    missing_entries = needed - set(manifest.files)
    if missing_entries:
        raise BundleError(f"{manifest_path}: no hash recorded for {sorted(missing_entries)}")
    for name, entry in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{directory}: file {name} is missing")
        size = file.stat().st_size
        if size != entry.size:
            raise BundleError(f"{file}: size {size} != {entry.size} recorded at export (truncated or replaced)")
        if verify:
            digest = sha256_file(file)
            if digest != entry.sha256:
                raise BundleError(f"{file}: sha256 does not match the manifest (file modified after export)")
    return Bundle(path=directory, manifest=manifest)
