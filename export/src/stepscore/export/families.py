"""Per-model adapters: detect the family, read the head, and derive the exact input format.

A *family* is how a step score is read out (token_cls, lm_pair, value_head, seq_cls); a *preset* is a
family plus the formatting of one line of models:

| preset          | family     | models                                   | format                                     |
|-----------------|------------|------------------------------------------|--------------------------------------------|
| qwen-prm        | token_cls  | Qwen2.5-Math-PRM, Qwen2.5-Math-7B-PRM800K | chat template; `<extra_0>` after each step |
| trl             | token_cls  | TRL PRMTrainer outputs, PURE-PRM         | prompt, then tok(step)+tok(separator)      |
| math-shepherd   | lm_pair    | Math-Shepherd                            | `q + " " + " ки\\n".join(steps) + " ки"`   |
| rlhflow         | lm_pair    | RLHFlow Llama3.1-8B-PRM-*                | chat turns, assistant `+` after each step  |
| skywork         | value_head | Skywork-o1-Open-PRM-Qwen-2.5             | bos+q+"\\n", then tok(step)+["\\n"]       |
| orm             | seq_cls    | outcome reward models                    | chat template, last token                  |

Chat templates are rendered once, here, with sentinel strings in place of the problem and the steps;
the rendering is cut into a `FormatSpec` (stepscore.runtime.bundle) so the runtime never runs a template
engine and never searches ids for tags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepscore.errors import ExportError
from stepscore.export.graph import DecoderSpec, HeadWeights
from stepscore.export.presets import DEFAULT_PRESET, PRESETS, ExportOptions, Preset
from stepscore.export.tokenizer import TokenizerInfo
from stepscore.export.weights import WeightStore
from stepscore.runtime.bundle import Family, FormatSpec, HeadSpec, Read, ScoreRule, Segment, Strip

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
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


# --- detection -----------------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no config.json; is this a Hugging Face model folder?")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def detect_preset(config: Mapping[str, Any], tok: TokenizerInfo, weights: WeightStore) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch.endswith("ForProcessRewardModel"):
        return "qwen-prm"
    if arch.endswith("ForPrmModel") or any(n.endswith("v_head.summary.weight") for n in weights.names()):
        return "skywork"
    if arch.endswith("ForTokenClassification"):
        return "trl"
    if arch.endswith("ForSequenceClassification"):
        return "orm"
    if arch.endswith("ForCausalLM"):
        if config.get("model_type") == "mistral" and len(tok.encode("ки")) == 1:
            return "math-shepherd"
        if tok.chat_template and "<|start_header_id|>" in tok.chat_template:
            return "rlhflow"
        raise ExportError(
            f"{arch} is a causal LM: say how it scores steps, e.g. --preset math-shepherd or --preset rlhflow, "
            "or --family lm_pair --tag TAG --candidates GOOD BAD"
        )
    raise ExportError(
        f"architecture {arch or '(none in config.json)'} is not a PRM stepscore recognises; pass --preset "
        f"({', '.join(PRESETS)}) or --family (token_cls, lm_pair, value_head, seq_cls)"
    )


def choose_preset(config: Mapping[str, Any], tok: TokenizerInfo, weights: WeightStore, opts: ExportOptions) -> Preset:
    if opts.preset is not None:
        if opts.preset not in PRESETS:
            raise ExportError(f"--preset {opts.preset!r} is not one of: {', '.join(PRESETS)}")
        preset = PRESETS[opts.preset]
        if opts.family is not None and opts.family != preset.family:
            raise ExportError(f"--preset {preset.name} is family {preset.family}, not --family {opts.family}")
        return preset
    if opts.family is not None:
        if opts.family not in DEFAULT_PRESET:
            raise ExportError(f"--family {opts.family!r} is not one of: {', '.join(DEFAULT_PRESET)}")
        try:
            detected = PRESETS[detect_preset(config, tok, weights)]
            if detected.family == opts.family:
                return detected
        except ExportError:
            pass
        return PRESETS[DEFAULT_PRESET[opts.family]]
    return PRESETS[detect_preset(config, tok, weights)]


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


def head_for(
    preset: Preset, config: Mapping[str, Any], weights: WeightStore, tok: TokenizerInfo, opts: ExportOptions
) -> tuple[HeadSpec, HeadWeights]:
    family = preset.family
    if family == "token_cls":
        layers: tuple[tuple[np.ndarray, np.ndarray | None], ...]
        if "score.0.weight" in weights:  # Qwen2ForProcessRewardModel: Linear-ReLU-Linear
            layers = (_linear(weights, "score.0"), _linear(weights, "score.2"))
        elif "score.weight" in weights:
            layers = (_linear(weights, "score"),)
        else:
            raise ExportError("token_cls model has no score head (score.weight or score.0/score.2)")
        labels = layers[-1][0].shape[1]
        if labels != 2:
            raise ExportError(f"token_cls head has {labels} labels; stepscore reads 2-label PRMs (softmax[1])")
        spec = HeadSpec("token_cls", "softmax1", 2, tag_id=None)
        return spec, HeadWeights(spec, layers)
    if family == "lm_pair":
        good, bad = opts.candidates or ("+", "-")
        hint = "pass --candidates with two single-token strings"
        ids = (tok.single_token(good, "candidate", hint), tok.single_token(bad, "candidate", hint))
        name = "lm_head.weight" if "lm_head.weight" in weights else None
        if name is None:
            if not config.get("tie_word_embeddings", False):
                raise ExportError("causal LM has no lm_head.weight and does not tie its embeddings")
            name = f"{body_prefix(weights)}embed_tokens.weight"
        rows = weights.get(name)[list(ids)]  # only the two candidate rows enter the graph
        spec = HeadSpec("lm_pair", "pair_softmax0", 2, candidate_ids=ids)
        return spec, HeadWeights(spec, ((rows.T.copy(), None),))
    if family == "value_head":
        names = [n[: -len(".weight")] for n in weights.names() if n.endswith("v_head.summary.weight")]
        if not names:
            raise ExportError("value_head model has no v_head.summary.weight")
        spec = HeadSpec("value_head", "sigmoid", 1)
        return spec, HeadWeights(spec, (_linear(weights, names[0]),))
    # seq_cls
    if "score.weight" not in weights:
        raise ExportError("sequence classifier has no score.weight")
    layer = _linear(weights, "score")
    labels = layer[0].shape[1]
    rule: ScoreRule
    if labels == 1:
        rule = "identity"
        if opts.activation == "sigmoid":
            rule = "sigmoid"
    elif labels == 2:
        rule = "softmax1"
    else:
        raise ExportError(f"sequence classifier has {labels} labels; stepscore reads 1 (reward) or 2 (softmax[1])")
    if opts.activation not in (None, "identity", "sigmoid") or (opts.activation == "sigmoid" and labels != 1):
        raise ExportError(f"--activation {opts.activation} does not apply to a {labels}-label head")
    spec = HeadSpec("seq_cls", rule, labels)
    return spec, HeadWeights(spec, (layer,))


# --- formats -------------------------------------------------------------------------------------

_SENTINEL = re.compile("\ue000([A-Z][0-9]?)\ue001")


def _s(name: str) -> str:
    return f"\ue000{name}\ue001"


Item = Segment | str  # a segment, or the name of a step sentinel ("S1", ...)
MessagesFn = Callable[[str, Sequence[str], str], list[dict[str, str]]]


def _parse(rendered: str, tok: TokenizerInfo, read: Segment | None) -> list[Item]:
    items: list[Item] = []
    pos = 0
    for match in _SENTINEL.finditer(rendered):
        items.extend(tok.split_literal(rendered[pos : match.start()]))
        name = match.group(1)
        if name == "P":
            items.append(Segment(field="problem"))
        elif name == "R":
            if read is None:
                raise ExportError("internal: read sentinel without a read segment")
            items.append(read)
        else:
            items.append(name)
        pos = match.end()
    items.extend(tok.split_literal(rendered[pos:]))
    if any(isinstance(i, Segment) and i.text and ("\ue000" in i.text or "\ue001" in i.text) for i in items):
        raise ExportError("the chat template rewrites message contents; stepscore cannot derive its format")
    return _merge_text(items)


def _merge_text(items: list[Item]) -> list[Item]:
    out: list[Item] = []
    for item in items:
        prev = out[-1] if out else None
        if (
            isinstance(item, Segment)
            and isinstance(prev, Segment)
            and item.text is not None
            and prev.text is not None
            and item.read is None
            and prev.read is None
        ):
            out[-1] = Segment(text=prev.text + item.text)
        else:
            out.append(item)
    return out


def _strips(tok: TokenizerInfo, messages: MessagesFn, read_text: str, n: int) -> tuple[Strip, Strip, Strip]:
    """Which whitespace the template strips from the problem, the first step and later steps."""
    steps = [f" {_s(f'S{k}')} " for k in range(1, n + 1)]
    padded = tok.render_chat(messages(f" {_s('P')} ", steps, read_text))

    def strip(name: str) -> Strip:
        return Strip(left=f" {_s(name)}" not in padded, right=f"{_s(name)} " not in padded)

    return strip("P"), strip("S1"), strip("S2") if n > 1 else strip("S1")


def chat_steps_format(tok: TokenizerInfo, messages: MessagesFn, read: Segment, description: str) -> FormatSpec:
    """Formats whose steps repeat a unit holding a read marker (qwen-prm, rlhflow)."""
    rendered = tok.render_chat(messages(_s("P"), [_s("S1"), _s("S2"), _s("S3")], _s("R")))
    items = _parse(rendered, tok, read)
    try:
        i1, i2, i3 = (items.index(f"S{k}") for k in (1, 2, 3))
    except ValueError as exc:
        raise ExportError("the chat template drops message contents; cannot derive the format") from exc
    prompt, unit, unit2, tail = items[:i1], items[i1 + 1 : i2], items[i2 + 1 : i3], items[i3 + 1 :]
    if unit != unit2:
        raise ExportError("the chat template renders successive steps differently; cannot derive one step unit")
    marks = [j for j, s in enumerate(unit) if isinstance(s, Segment) and s.read is not None]
    if len(marks) != 1:
        raise ExportError(f"expected one step tag between steps, found {len(marks)}")
    r = marks[0]
    if tail[: r + 1] != unit[: r + 1]:
        raise ExportError("the chat template renders the last step differently from the others")
    strip_p, strip_first, strip_step = _strips(tok, messages, _s("R"), 3)
    return FormatSpec(
        prompt=tuple(_segments(prompt)),
        step=(Segment(field="step"), *_segments(unit[: r + 1])),
        separator=tuple(_segments(unit[r + 1 :])),
        strip_problem=strip_p,
        strip_first_step=strip_first,
        strip_step=strip_step,
        description=description,
    )


def chat_response_format(tok: TokenizerInfo, messages: MessagesFn, join: str, description: str) -> FormatSpec:
    """Outcome models: the whole solution as one assistant message, scored at the last token."""
    items = _parse(tok.render_chat(messages(_s("P"), [_s("S1")], "")), tok, None)
    i1 = items.index("S1")
    prompt, tail = _segments(items[:i1]), _segments(items[i1 + 1 :])
    if tail:
        last = tail[-1]
        tail[-1] = Segment(text=last.text, ids=last.ids, read=Read(0))
        step = (Segment(field="step"), *tail)
    else:
        step = (Segment(field="step", read=Read(0)),)
    strip_p, strip_first, _ = _strips(tok, messages, "", 1)
    return FormatSpec(
        prompt=tuple(prompt),
        step=step,
        strip_problem=strip_p,
        strip_first_step=strip_first,
        strip_step=strip_first,
        join_steps=join,
        description=description,
    )


def _segments(items: Sequence[Item]) -> list[Segment]:
    out: list[Segment] = []
    for item in items:
        if not isinstance(item, Segment):
            raise ExportError(f"the chat template places step {item} where only template text was expected")
        out.append(item)
    return out


def _bos(tok: TokenizerInfo) -> list[Segment]:
    text = tok.special("bos_token")
    tid = tok.token_id(text) if text else None
    return [Segment(ids=(tid,))] if tid is not None else []


def format_for(preset: Preset, tok: TokenizerInfo, opts: ExportOptions, head: HeadSpec) -> tuple[FormatSpec, HeadSpec]:
    """The FormatSpec of a preset for this tokenizer, and the head spec completed with the tag id."""
    name = preset.name
    system = opts.system_prompt
    if name == "qwen-prm":
        tag = opts.tag or "<extra_0>"
        tag_id = tok.token_id(tag)
        if tag_id is None:
            raise ExportError(f"tag {tag!r} is not a token of this tokenizer; pass --tag with the model's step tag")
        sys_text = QWEN_MATH_SYSTEM if system is None else system

        def qwen_messages(p: str, steps: Sequence[str], r: str) -> list[dict[str, str]]:
            msgs = [{"role": "system", "content": sys_text}] if sys_text else []
            return [*msgs, {"role": "user", "content": p}, {"role": "assistant", "content": "".join(s + r for s in steps)}]

        spec = chat_steps_format(
            tok, qwen_messages, Segment(ids=(tag_id,), read=Read(0)), f"chat template; {tag} (id {tag_id}) after every step"
        )
        return spec, _with_tag(head, tag_id)
    if name == "rlhflow":
        good = opts.candidates[0] if opts.candidates else "+"
        good_id = tok.single_token(good, "candidate", "pass --candidates with single-token strings")

        def rlhflow_messages(p: str, steps: Sequence[str], r: str) -> list[dict[str, str]]:
            msgs = [{"role": "system", "content": system}] if system else []
            for k, step in enumerate(steps):
                msgs.append({"role": "user", "content": f"{p} {step}" if k == 0 else step})
                msgs.append({"role": "assistant", "content": r})
            return msgs

        read = Segment(text=good, read=Read(offset=-1, expect=good_id))
        spec = chat_steps_format(
            tok, rlhflow_messages, read, f"chat turns: user = step, assistant = {good!r}; read one token before it"
        )
        return spec, head
    if name == "orm":
        join = opts.step_separator if opts.step_separator is not None else "\n\n"
        if opts.chat_template and tok.chat_template:

            def orm_messages(p: str, steps: Sequence[str], r: str) -> list[dict[str, str]]:
                msgs = [{"role": "system", "content": system}] if system else []
                return [*msgs, {"role": "user", "content": p}, {"role": "assistant", "content": steps[0]}]

            return chat_response_format(tok, orm_messages, join, "chat template; solution scored at its last token"), head
        spec = FormatSpec(
            prompt=(*_bos(tok), Segment(field="problem"), Segment(text="\n")),
            step=(Segment(field="step", read=Read(0)),),
            join_steps=join,
            description="problem, newline, solution; scored at the last token",
        )
        return spec, head
    if name == "math-shepherd" or (preset.family == "lm_pair"):
        tag = opts.tag or "ки"
        tag_text = f" {tag}"
        tag_id = _text_tag_id(tok, tag_text)
        spec = FormatSpec(
            prompt=(
                *([Segment(ids=(tok.bos_id,))] if tok.bos_id is not None else []),
                Segment(field="problem"),
                Segment(text=" "),
            ),
            step=(Segment(field="step"), Segment(text=tag_text, read=Read(0, expect=tag_id))),
            separator=(Segment(text=opts.step_separator if opts.step_separator is not None else "\n"),),
            description=f"problem + ' ' + ' {tag}\\n'.join(steps) + ' {tag}'",
        )
        return spec, _with_tag(head, tag_id)
    if name == "skywork":
        # Skywork appends the id of encode(step_token)[-1] to each separately encoded step.
        sep = opts.tag or (opts.step_separator if opts.step_separator is not None else "\n")
        sep_id = tok.single_token(sep, "step tag", "pass --tag with a single-token tag")
        spec = FormatSpec(
            prompt=(*_bos(tok), Segment(field="problem"), Segment(text="\n"), Segment(brk=True)),
            step=(Segment(field="step"), Segment(brk=True), Segment(ids=(sep_id,), read=Read(0))),
            description="bos + problem + '\\n', then tok(step) + [newline id] per step",
        )
        return spec, _with_tag(head, sep_id)
    # trl
    sep = opts.step_separator if opts.step_separator is not None else "\n"
    sep_ids = tuple(tok.encode(sep))
    if not sep_ids:
        raise ExportError(f"step separator {sep!r} tokenizes to nothing; pass another --step-separator")
    bos = tok.token_id(tok.special("bos_token") or "") if tok.special("bos_token") else None
    spec = FormatSpec(
        prompt=(*([Segment(ids=(bos,))] if bos is not None else []), Segment(field="problem"), Segment(brk=True)),
        step=(Segment(field="step"), Segment(brk=True), Segment(ids=sep_ids, read=Read(0))),
        description=f"prompt, then tok(step) + tok({sep!r}) per step; read at the separator's last token",
    )
    return spec, _with_tag(head, sep_ids[-1])


def _with_tag(head: HeadSpec, tag_id: int) -> HeadSpec:
    return HeadSpec(head.family, head.score, head.num_labels, head.candidate_ids, tag_id)


def _text_tag_id(tok: TokenizerInfo, tag_text: str) -> int:
    """The single token a text tag becomes after ordinary step text (checked in context)."""
    probe = "Step 1: 2 + 2 = 4."
    enc = tok.plain.encode(probe + tag_text, add_special_tokens=False)
    end_of_tag = len(probe) + len(tag_text)
    covering = [t for t, (lo, hi) in zip(enc.ids, enc.offsets, strict=True) if hi > len(probe) and lo < end_of_tag]
    if len(covering) != 1:
        raise ExportError(
            f"tag {tag_text.strip()!r} is {len(covering)} tokens after step text in this tokenizer, not one; "
            "pass --tag with a single-token tag"
        )
    return int(covering[0])


# --- the plan ------------------------------------------------------------------------------------


def plan_export(model_dir: Path, tok: TokenizerInfo, weights: WeightStore, opts: ExportOptions) -> ModelPlan:
    config = read_config(model_dir)
    preset = choose_preset(config, tok, weights, opts)
    prefix = body_prefix(weights)
    decoder = decoder_spec(config, weights, prefix)
    head, head_weights = head_for(preset, config, weights, tok, opts)
    fmt, head = format_for(preset, tok, opts, head)
    head_weights = HeadWeights(head, head_weights.layers)
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
        head_weights=head_weights,
        format=fmt,
        max_seq_len=max_seq_len,
        config=config,
    )
