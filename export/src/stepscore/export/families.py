"""Per-model adapters: read the model (config, weights, tokenizer facts), pick its preset, read its head,
and put the export plan together.

Presets are records (stepscore.export.presets: family, head, tag, candidates, separator, system prompt,
template) and detection is rules over `ModelFacts`; the input format is built from a record by
stepscore.export.formats. This module only gathers facts and decides; it holds no per-preset branches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stepscore.errors import ExportError
from stepscore.export.formats import Choices, choices, format_for
from stepscore.export.graph import DecoderSpec, HeadWeights
from stepscore.export.presets import ExportOptions, HeadRule, ModelFacts, Preset, choose
from stepscore.export.tokenizer import TokenizerInfo
from stepscore.export.training_args import TRAINING_ARGS, saved_training_arg
from stepscore.export.weights import WeightStore
from stepscore.runtime.bundle import Family, FormatSpec, HeadSpec, ScoreRule

SUPPORTED_BODIES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MAX_SEQ_LEN = 32768
# onnxruntime's RotaryEmbedding refuses rows longer than its cos/sin cache, whatever the position ids,
# so the cache covers the longest packed row the runtime may build, not only the longest candidate.
MAX_ROW_TOKENS = 32768


@dataclass(frozen=True)
class ModelPlan:
    """Every decision of an export, made before any heavy work starts."""

    preset: str
    family: Family
    architecture: str
    model_type: str
    decoder: DecoderSpec
    body_prefix: str  # prefix of the body's tensors in the checkpoint ("model.")
    head: HeadSpec
    head_weights: HeadWeights
    format: FormatSpec
    max_seq_len: int
    config: Mapping[str, Any]
    notes: tuple[str, ...] = ()  # where choices came from, said at export
    warnings: tuple[str, ...] = ()  # guesses the user should check


# --- detection -----------------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no config.json; is this a Hugging Face model folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{path}: not a JSON object")
    return config


def model_facts(config: Mapping[str, Any], tok: TokenizerInfo, weights: WeightStore) -> ModelFacts:
    archs = config.get("architectures") or []
    return ModelFacts(
        architecture=str(archs[0]) if archs else "",
        model_type=str(config.get("model_type", "")),
        weight_names=weights.names(),
        chat_template=tok.chat_template,
        single_token=lambda text: len(tok.encode(text)) == 1,
    )


def choose_preset(config: Mapping[str, Any], tok: TokenizerInfo, weights: WeightStore, opts: ExportOptions) -> Preset:
    return choose(model_facts(config, tok, weights), opts.preset, opts.family)


def step_separator(
    preset: Preset, model_dir: Path, config: Mapping[str, Any], opts: ExportOptions
) -> tuple[str | None, list[str], list[str]]:
    """The separator to build the format with, and what to say about where it came from (notes, warnings)."""
    if opts.step_separator is not None or preset.separator is None:
        return opts.step_separator if opts.step_separator is not None else preset.separator, [], []
    key = preset.separator_saved_as
    if key is None:
        return preset.separator, [], []
    found = saved_training_arg(model_dir, config, key)
    if found is not None and isinstance(found.value, str) and found.value:
        return found.value, [f"step separator {found.value!r} from {found.where}"], []
    return (
        preset.separator,
        [],
        [
            f"step separator {preset.separator!r} is the {preset.name} default, a guess: neither {TRAINING_ARGS} beside "
            f"the checkpoint nor config.json says which separator it was trained with; pass --step-separator if another"
        ],
    )


# --- the body ------------------------------------------------------------------------------------


def decoder_spec(config: Mapping[str, Any], weights: WeightStore, prefix: str) -> DecoderSpec:
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_BODIES:
        raise ExportError(f"model_type {model_type!r} is not supported yet (supported bodies: {', '.join(SUPPORTED_BODIES)})")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"hidden_act {act!r} is not supported (only silu)")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    attention_bias = bool(config.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias
    spec = DecoderSpec(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
    )
    if heads % kv_heads:
        raise ExportError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    needed = [f"{prefix}embed_tokens.weight", f"{prefix}layers.0.self_attn.q_proj.weight", f"{prefix}norm.weight"]
    if spec.qkv_bias:
        needed.append(f"{prefix}layers.0.self_attn.q_proj.bias")
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ExportError(f"checkpoint lacks {missing}: not a {model_type} decoder stepscore can read")
    return spec


def body_prefix(weights: WeightStore) -> str:
    for name in weights.names():
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise ExportError("checkpoint has no embed_tokens.weight: not a decoder model stepscore can read")


def model_limit(config: Mapping[str, Any]) -> int:
    limit = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    # Mistral attends within a sliding window; beyond it our full attention would differ.
    if window and (config.get("model_type") == "mistral" or config.get("use_sliding_window")):
        limit = min(limit, int(window))
    return limit


def rope_cache(config_dir: Path, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, head_dim/2] computed by transformers' own rotary module (every rope type)."""
    import importlib

    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_dir))
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding") and not n.startswith("_"))
    rotary = cls(config=config)
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise ExportError(f"rope type {rope_type!r} depends on the sequence length; not supported")
    positions = torch.arange(max_len, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy().astype(np.float32), sin[0, :, :half].numpy().astype(np.float32)


# --- heads ---------------------------------------------------------------------------------------


def _linear(weights: WeightStore, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    mat = weights.get(f"{name}.weight")
    bias = weights.get(f"{name}.bias") if f"{name}.bias" in weights else None
    return mat.T.copy(), bias


Layers = tuple[tuple[np.ndarray, np.ndarray | None], ...]  # (W [in, out], bias) per linear layer


def _token_cls_head(
    weights: WeightStore, config: Mapping[str, Any], tok: TokenizerInfo, chosen: Choices, _: str | None
) -> tuple[HeadSpec, Layers]:
    layers: Layers
    if "score.0.weight" in weights:  # Qwen2ForProcessRewardModel: Linear-ReLU-Linear
        layers = (_linear(weights, "score.0"), _linear(weights, "score.2"))
    elif "score.weight" in weights:
        layers = (_linear(weights, "score"),)
    else:
        raise ExportError("token_cls model has no score head (score.weight or score.0/score.2)")
    labels = layers[-1][0].shape[1]
    if labels != 2:
        raise ExportError(f"token_cls head has {labels} labels; stepscore reads 2-label PRMs (softmax[1])")
    return HeadSpec("token_cls", "softmax1", 2), layers


def _lm_pair_head(
    weights: WeightStore, config: Mapping[str, Any], tok: TokenizerInfo, chosen: Choices, _: str | None
) -> tuple[HeadSpec, Layers]:
    good, bad = chosen.candidates or ("+", "-")
    hint = "pass --candidates with two single-token strings"
    ids = (tok.single_token(good, "candidate", hint), tok.single_token(bad, "candidate", hint))
    name = "lm_head.weight" if "lm_head.weight" in weights else None
    if name is None:
        if not config.get("tie_word_embeddings", False):
            raise ExportError("causal LM has no lm_head.weight and does not tie its embeddings")
        name = f"{body_prefix(weights)}embed_tokens.weight"
    rows = weights.get(name)[list(ids)]  # only the two candidate rows enter the graph
    return HeadSpec("lm_pair", "pair_softmax0", 2, candidate_ids=ids), ((rows.T.copy(), None),)


def _value_head(
    weights: WeightStore, config: Mapping[str, Any], tok: TokenizerInfo, chosen: Choices, _: str | None
) -> tuple[HeadSpec, Layers]:
    names = [n[: -len(".weight")] for n in weights.names() if n.endswith("v_head.summary.weight")]
    if not names:
        raise ExportError("value_head model has no v_head.summary.weight")
    return HeadSpec("value_head", "sigmoid", 1), (_linear(weights, names[0]),)


def _seq_cls_head(
    weights: WeightStore, config: Mapping[str, Any], tok: TokenizerInfo, chosen: Choices, activation: str | None
) -> tuple[HeadSpec, Layers]:
    if "score.weight" not in weights:
        raise ExportError("sequence classifier has no score.weight")
    layer = _linear(weights, "score")
    labels = layer[0].shape[1]
    rule: ScoreRule
    if labels == 1:
        rule = "sigmoid" if activation == "sigmoid" else "identity"
    elif labels == 2:
        rule = "softmax1"
    else:
        raise ExportError(f"sequence classifier has {labels} labels; stepscore reads 1 (reward) or 2 (softmax[1])")
    if activation not in (None, "identity", "sigmoid") or (activation == "sigmoid" and labels != 1):
        raise ExportError(f"--activation {activation} does not apply to a {labels}-label head")
    return HeadSpec("seq_cls", rule, labels), (layer,)


HeadReader = Callable[[WeightStore, Mapping[str, Any], TokenizerInfo, Choices, "str | None"], tuple[HeadSpec, Layers]]
# a preset's head rule -> how that head is read from the checkpoint
HEAD_READERS: dict[HeadRule, HeadReader] = {
    "softmax1": _token_cls_head,
    "pair_softmax0": _lm_pair_head,
    "sigmoid": _value_head,
    "by_labels": _seq_cls_head,
}


# --- the plan ------------------------------------------------------------------------------------


def plan_export(model_dir: Path, tok: TokenizerInfo, weights: WeightStore, opts: ExportOptions) -> ModelPlan:
    config = read_config(model_dir)
    preset = choose_preset(config, tok, weights, opts)
    opts.check_against(preset, bool(tok.chat_template))
    separator, notes, warnings = step_separator(preset, model_dir, config, opts)
    if preset.note and opts.preset is None:
        notes.append(preset.note)
    chosen = choices(preset, tok, opts, separator)
    prefix = body_prefix(weights)
    decoder = decoder_spec(config, weights, prefix)
    head, layers = HEAD_READERS[preset.head](weights, config, tok, chosen, opts.activation)
    fmt, tag_id = format_for(preset, tok, chosen)
    if tag_id is not None:
        head = replace(head, tag_id=tag_id)
    limit = model_limit(config)
    max_seq_len = opts.max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len > limit:
        raise ExportError(f"--max-seq-len {max_seq_len} is beyond the model's limit of {limit} tokens")
    if tok.vocab_size > decoder.vocab_size:
        # Ids past the embedding table would index out of range in the graph.
        raise ExportError(f"tokenizer has {tok.vocab_size} tokens but the model's embedding table has {decoder.vocab_size}")
    archs = config.get("architectures") or ["?"]
    return ModelPlan(
        preset=preset.name,
        family=preset.family,
        architecture=str(archs[0]),
        model_type=str(config["model_type"]),
        decoder=decoder,
        body_prefix=prefix,
        head=head,
        head_weights=HeadWeights(head, layers),
        format=fmt,
        max_seq_len=max_seq_len,
        config=config,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )
