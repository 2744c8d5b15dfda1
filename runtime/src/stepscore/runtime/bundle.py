"""The bundle: an exported directory (graph, tokenizer, manifest.json) and its one schema.

Export writes bundles through `write_manifest`; the runtime reads them through `load_bundle`. Both sides
use the dataclasses below, so the manifest has exactly one definition. Loading refuses, with a one-line
`BundleError` and before anything is served:

- a manifest whose own content no longer matches the digest written beside it (edited after export);
- a path that is not a plain file name inside the bundle (`..`, absolute, a separator, a link leading out):
  nothing outside the bundle folder is ever opened, so no error can tell anything about an outside file;
- a file whose size or sha256 differs from the manifest (tampered or truncated);
- a manifest that contradicts itself or its tokenizer: family and head disagree, the graph's outputs are
  not the contract's, the tag or candidate ids do not decode to the token texts recorded beside them.

The graph contract (input and output names, shapes and meaning) is documented in docs/graph-contract.md
and pinned here by `GRAPH_CONTRACT` and the `INPUTS` / `OUTPUTS` tuples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from stepscore.errors import BundleError
from stepscore.version import __version__

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# sha256 of the manifest's own content (every other key, canonical JSON), written last by write_manifest
DIGEST_KEY = "manifest_sha256"

# Version of the graph's calling convention; bumped when inputs/outputs change meaning.
GRAPH_CONTRACT = 1
INPUTS = ("input_ids", "position_ids", "attn_end", "step_positions")
OUTPUTS = ("step_scores",)
# The plain-row graph (stepscore.export.plain): one sequence per row, right-padded, lengths instead of attn_end.
PLAIN_INPUTS = ("input_ids", "seq_lens", "step_positions")
# The cached graph (stepscore.export.cached): the tree graph's inputs for the new tokens only, plus how many
# cached tokens each row continues and their K/V per layer; outputs the new tokens' K/V too.
PAST_LEN = "past_len"


def cached_inputs(num_layers: int) -> tuple[str, ...]:
    """Input names of the cached graph, in order."""
    kv = tuple(f"past_{which}.{i}" for i in range(num_layers) for which in ("key", "value"))
    return (*INPUTS, PAST_LEN, *kv)


def cached_outputs(num_layers: int) -> tuple[str, ...]:
    """Output names of the cached graph, in order: the scores, then each layer's K/V of the new tokens."""
    kv = tuple(f"present_{which}.{i}" for i in range(num_layers) for which in ("key", "value"))
    return (*OUTPUTS, *kv)


Family = Literal["token_cls", "lm_pair", "value_head", "seq_cls"]
FAMILIES: tuple[Family, ...] = ("token_cls", "lm_pair", "value_head", "seq_cls")
Precision = Literal["fp16", "fp32"]
ScoreRule = Literal["softmax1", "pair_softmax0", "sigmoid", "identity"]
# The heads each family reads out with: (score rule, number of labels).
FAMILY_HEADS: dict[str, frozenset[tuple[str, int]]] = {
    "token_cls": frozenset({("softmax1", 2)}),
    "lm_pair": frozenset({("pair_softmax0", 2)}),
    "value_head": frozenset({("sigmoid", 1)}),
    "seq_cls": frozenset({("softmax1", 2), ("identity", 1), ("sigmoid", 1)}),
}


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
    # The tokenizer's text of those ids (its vocabulary entries), recorded by write_manifest: load checks that
    # the ids still decode to them, so an edited id is an error instead of silently wrong scores.
    tag_token: str | None = None
    candidate_tokens: tuple[str, str] | None = None


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


CACHED_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention")


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
    # The cached variant (cached_inputs/cached_outputs; stepscore.export.cached) the prefix cache runs
    # suffixes through, sharing `data_file`; None in bundles exported before it (no prefix cache then).
    cached_file: str | None = None
    # The attention op of the cached graph: "GroupQueryAttention" reads each row's own past; older bundles and
    # head sizes GroupQueryAttention refuses have "MultiHeadAttention" (pasts padded to the longest).
    cached_attention: str = "MultiHeadAttention"


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
                "candidate_tokens": list(self.head.candidate_tokens) if self.head.candidate_tokens else None,
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
                    tag_token=head.get("tag_token"),
                    candidate_tokens=tuple(head["candidate_tokens"]) if head.get("candidate_tokens") else None,
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
                    cached_file=graph.get("cached_file"),
                    cached_attention=str(graph.get("cached_attention", "MultiHeadAttention")),
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
        manifest.check_meaning()
        return manifest

    def check_meaning(self) -> None:
        """What the manifest says must hang together: the head is one its family has, the graph's outputs
        are the contract's, every token id is inside the vocabulary and the step's read sits on the tag."""
        head = self.head
        if head.family != self.family:
            raise BundleError(f"manifest family {self.family!r} but head.family {head.family!r}: they must agree")
        if (head.score, head.num_labels) not in FAMILY_HEADS[self.family]:
            raise BundleError(
                f"manifest head (score {head.score!r}, {head.num_labels} labels) is not a {self.family} head; "
                f"a {self.family} head is one of {sorted(FAMILY_HEADS[self.family])}"
            )
        if (self.family == "lm_pair") != (head.candidate_ids is not None):
            raise BundleError(f"manifest head.candidate_ids must be set for lm_pair and only for it (family {self.family!r})")
        if self.graph.outputs != OUTPUTS:
            raise BundleError(
                f"manifest graph.outputs {self.graph.outputs} are not the contract's {OUTPUTS}; re-export the model"
            )
        if self.graph.cached_attention not in CACHED_ATTENTION_OPS:
            raise BundleError(
                f"manifest graph.cached_attention {self.graph.cached_attention!r} is not one of {CACHED_ATTENTION_OPS}"
            )
        vocab = self.model.vocab_size
        named: list[tuple[str, int | None]] = [("head.tag_id", head.tag_id)]
        named += [(f"head.candidate_ids[{k}]", i) for k, i in enumerate(head.candidate_ids or ())]
        for part in ("prompt", "step", "separator"):
            for k, seg in enumerate(getattr(self.format, part)):
                named += [(f"format.{part}[{k}].ids[{j}]", i) for j, i in enumerate(seg.ids or ())]
                named.append((f"format.{part}[{k}].read.expect", seg.read.expect if seg.read else None))
        for where, token in named:
            if token is not None and not (isinstance(token, int) and 0 <= token < vocab):
                raise BundleError(f"manifest {where} {token!r} is outside the vocabulary [0, {vocab})")
        read = next(seg for seg in self.format.step if seg.read is not None)
        if head.tag_id is not None and read.read is not None and read.read.offset == 0:
            at = read.ids[-1] if read.ids else read.read.expect
            if at is not None and at != head.tag_id:
                raise BundleError(f"manifest head.tag_id {head.tag_id} is not the id the step's score is read at ({at})")


# --- reading and writing ---------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(directory: Path, names: Sequence[str]) -> dict[str, FileEntry]:
    return {name: FileEntry(sha256=sha256_file(directory / name), size=(directory / name).stat().st_size) for name in names}


def manifest_digest(obj: Mapping[str, Any]) -> str:
    """sha256 of a manifest's content without its digest key: canonical JSON (sorted keys, no spaces, UTF-8)."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tokenizer(directory: Path, manifest: Manifest) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(directory / manifest.tokenizer_file))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise BundleError(f"{manifest.tokenizer_file}: not a tokenizer the runtime can read ({exc})") from None


def with_token_texts(directory: Path, manifest: Manifest) -> Manifest:
    """The manifest with the tokenizer's text of its tag and candidate ids recorded (HeadSpec.tag_token,
    candidate_tokens), for load to check them against."""
    head = manifest.head
    if head.tag_id is None and head.candidate_ids is None:
        return manifest
    tok = _tokenizer(directory, manifest)

    def text(where: str, token: int) -> str:
        got = tok.id_to_token(token)
        if got is None:
            raise BundleError(f"head.{where} {token} is not a token of {manifest.tokenizer_file}")
        return str(got)

    tag = text("tag_id", head.tag_id) if head.tag_id is not None else None
    pair = tuple(text(f"candidate_ids[{k}]", i) for k, i in enumerate(head.candidate_ids)) if head.candidate_ids else None
    for recorded, got in ((head.tag_token, tag), (head.candidate_tokens, pair)):
        if recorded is not None and recorded != got:
            raise BundleError(f"head token texts {recorded!r} disagree with the tokenizer's {got!r}")
    return replace(manifest, head=replace(head, tag_token=tag, candidate_tokens=pair if pair is None else (pair[0], pair[1])))


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (a crash never leaves a half-written manifest): the token texts of the
    head's ids recorded, and the digest of the whole content last."""
    obj = with_token_texts(directory, manifest).to_json()
    obj[DIGEST_KEY] = manifest_digest(obj)
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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
    def cached_graph_path(self) -> Path | None:
        cached = self.manifest.graph.cached_file
        return self.path / cached if cached else None

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer_file


def _plain_name(where: str, name: object) -> str:
    """A manifest path must be one plain file name: no separator, no '..', nothing absolute or drive-relative."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\:\0"):
        raise BundleError(
            f"manifest {where} {name!r} is not a plain file name inside the bundle (no '/', '..', drive or absolute path)"
        )
    return name


def _named_paths(manifest: Manifest) -> list[tuple[str, str]]:
    """(field, name) of every path the manifest holds."""
    g = manifest.graph
    out = [("graph.file", g.file), ("tokenizer.file", manifest.tokenizer_file)]
    named = (("graph.data_file", g.data_file), ("graph.plain_file", g.plain_file), ("graph.cached_file", g.cached_file))
    out += [(field, name) for field, name in named if name]
    out += [(f"files[{name!r}]", name) for name in manifest.files]
    return out


def _contained(directory: Path) -> None:
    """No link in the bundle folder may lead outside it (graphs name their external data by path too)."""
    root = directory.resolve()
    for top, dirs, files in os.walk(directory):
        for entry in (*dirs, *files):
            path = Path(top) / entry
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise BundleError(f"{directory}: {path.relative_to(directory)} is a link leading outside the bundle")


def _check_tokens(directory: Path, manifest: Manifest) -> None:
    head = manifest.head
    checks: list[tuple[str, int, str | None]] = []
    if head.tag_id is not None:
        checks.append(("tag", head.tag_id, head.tag_token))
    for k, token in enumerate(head.candidate_ids or ()):
        checks.append((f"candidate {k}", token, head.candidate_tokens[k] if head.candidate_tokens else None))
    if not checks:
        return
    tok = _tokenizer(directory, manifest)
    for what, token, recorded in checks:
        if recorded is None:
            raise BundleError(f"manifest head records no token text for its {what} id {token}; re-export the model")
        got = tok.id_to_token(token)
        if got != recorded:
            raise BundleError(
                f"manifest {what} id {token} is {got!r} in the bundle's tokenizer, but the manifest records {recorded!r}: "
                "the manifest was edited or belongs to another tokenizer; re-export the model"
            )


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read and check a bundle. `verify=False` skips the sha256 pass (sizes are always checked)."""
    directory = Path(path)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle directory (export one with `stepscore export MODEL OUT`)")
    if not manifest_path.is_file():
        raise BundleError(f"{directory}: no {MANIFEST_NAME}; is this a bundle written by `stepscore export`?")
    _contained(directory)
    try:
        obj = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if not isinstance(obj, dict):
        raise BundleError(f"{manifest_path}: a manifest is a JSON object")
    manifest = Manifest.from_json(obj)
    recorded = obj.get(DIGEST_KEY)
    if recorded is None:
        raise BundleError(f"{manifest_path}: no {DIGEST_KEY} (written before stepscore checked it); re-export the model")
    if recorded != manifest_digest(obj):
        raise BundleError(
            f"{manifest_path}: content does not match its {DIGEST_KEY} (edited after export); re-export the model"
        )
    for where, name in _named_paths(manifest):
        _plain_name(where, name)
    needed = {manifest.graph.file, manifest.tokenizer_file}
    if manifest.graph.data_file:
        needed.add(manifest.graph.data_file)
    needed.update(name for name in (manifest.graph.plain_file, manifest.graph.cached_file) if name)
    missing_entries = needed - set(manifest.files)
    if missing_entries:
        raise BundleError(f"{manifest_path}: no hash recorded for {sorted(missing_entries)}")
    for name, entry in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{directory}: file {name} is missing")
        size = file.stat().st_size  # inside the bundle: _contained and _plain_name made sure of it
        if size != entry.size:
            raise BundleError(f"{file}: size {size} != {entry.size} recorded at export (truncated or replaced)")
        if verify:
            digest = sha256_file(file)
            if digest != entry.sha256:
                raise BundleError(f"{file}: sha256 does not match the manifest (file modified after export)")
    _check_tokens(directory, manifest)
    return Bundle(path=directory, manifest=manifest)
