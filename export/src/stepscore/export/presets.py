"""Presets as records, detection as rules, and the export options: light definitions the CLI imports
without torch or onnx.

A *preset* is one line of models: a family (how a step score is read out) plus the exact input format of
that line's reference scoring code. Each is one `Preset` record below; nothing else in export branches on
a preset's name. The format is a `TextTemplate` (placeholders, no template engine) or a `ChatTemplate`
(the model's own chat template, rendered once at export by stepscore.export.formats).

| preset            | family     | models                                    | reference code                                 |
|-------------------|------------|-------------------------------------------|------------------------------------------------|
| qwen-prm          | token_cls  | Qwen2.5-Math-PRM, Qwen2.5-Math-7B-PRM800K | model card: chat, `<extra_0>` after each step   |
| trl               | token_cls  | TRL PRMTrainer outputs, PURE-PRM          | PRMTrainer.tokenize_row                         |
| math-shepherd     | lm_pair    | Math-Shepherd                             | model card: `q + " " + " ки\\n".join(steps)...` |
| math-shepherd-sal | lm_pair    | Math-Shepherd as search-and-learn calls it | sal.models.reward_models.MathShepherd          |
| rlhflow           | lm_pair    | RLHFlow Llama3.1-8B-PRM-*                 | prm_evaluate.py: a chat turn per step           |
| skywork           | value_head | Skywork-o1-Open-PRM-Qwen-2.5              | io_utils.py: tok(step) + [newline id]           |
| orm               | seq_cls    | outcome reward models                     | chat template, the solution's last token        |
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from stepscore.errors import ExportError
from stepscore.runtime.bundle import Family, Precision

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# search-and-learn's default `Config.system_prompt` (src/sal/config.py), which its MathShepherd class puts
# before every question
SAL_SYSTEM = (
    "Solve the following math problem efficiently and clearly:\n\n"
    "- For simple problems (2 steps or fewer):\nProvide a concise solution with minimal explanation.\n\n"
    "- For complex problems (3 steps or more):\nUse this step-by-step format:\n\n"
    "## Step 1: [Concise description]\n[Brief explanation and calculations]\n\n"
    "## Step 2: [Concise description]\n[Brief explanation and calculations]\n\n"
    "...\n\n"
    "Regardless of the approach, always conclude with:\n\n"
    "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.\n\n"
    "Where [answer] is just the final number or expression that solves the problem."
)

HeadRule = Literal["softmax1", "pair_softmax0", "sigmoid", "by_labels"]
ChatLayout = Literal["assistant_steps", "turn_per_step", "whole_solution"]


@dataclass(frozen=True)
class TextTemplate:
    """A format written out as text with placeholders (no chat template involved):

    - `{problem}`, `{step}`: the user's text (tokenized as plain text: special-token strings stay text);
    - `{solution}`: the steps joined by the separator, scored once at its last token (outcome models);
    - `{system}`: the system prompt; `{separator}`: the step separator, as text;
    - `{bos}`: the tokenizer config's bos_token as an id (`tokenizer.bos_token_id`), if it has one;
      `{encode_bos}`: the id the tokenizer's own encode() prepends (`tokenizer(text)`), if any;
    - `{tag}`: the tag as text, read at the one token it must become after the step;
    - `{tag_id}`: the tag inserted as its single id and read there;
    - `{separator_ids}`: the separator tokenized on its own, inserted as ids, read at its last id;
    - `{break}`: the text before and after is tokenized separately (per-step tokenization).

    A candidate is `prompt + step(1) + between + step(2) + ... + step(n)`.
    """

    prompt: str
    step: str
    between: str = ""


@dataclass(frozen=True)
class ChatTemplate:
    """A format rendered from the tokenizer's chat template, with messages laid out as `layout` says:

    - assistant_steps: [system], user = problem, assistant = each step followed by the tag;
    - turn_per_step: [system], then per step a user turn (the first one: problem + " " + step) answered
      by an assistant turn holding the good candidate; read at the token before it;
    - whole_solution: [system], user = problem, assistant = the steps joined by the separator.

    Without a chat template in the tokenizer (or with --no-chat-template), `fallback` applies.
    """

    layout: ChatLayout
    fallback: TextTemplate | None = None


@dataclass(frozen=True)
class Preset:
    """One line of models. `None` in `tag`, `separator` or `system_prompt` means the format has no such
    thing, so the matching option is refused rather than ignored."""

    name: str
    family: Family
    head: HeadRule  # how the head's output becomes a score
    summary: str
    template: TextTemplate | ChatTemplate
    tag: str | None = None  # the step tag (a text tag or a token), overridable with --tag
    candidates: tuple[str, str] | None = None  # lm_pair: the (good, bad) tokens compared
    separator: str | None = None  # default step separator (--step-separator)
    system_prompt: str | None = None  # default system prompt (--system-prompt); "" = none by default
    # the training argument that holds the separator a checkpoint was trained with (read when saved)
    separator_saved_as: str | None = None
    note: str = ""  # said at export when detection picked this preset


PRESET_LIST: tuple[Preset, ...] = (
    Preset(
        "qwen-prm",
        "token_cls",
        "softmax1",
        "Qwen2.5-Math-PRM: chat template, <extra_0> after every step, softmax[1]",
        ChatTemplate("assistant_steps"),
        tag="<extra_0>",
        system_prompt=QWEN_MATH_SYSTEM,
    ),
    Preset(
        "trl",
        "token_cls",
        "softmax1",
        "TRL PRMTrainer output: prompt, then tok(step) + tok(separator) per step, softmax[1]",
        TextTemplate(prompt="{bos}{problem}{break}", step="{step}{break}{separator_ids}"),
        separator="\n",  # PRMConfig.step_separator's default, used only when the checkpoint does not say
        separator_saved_as="step_separator",
    ),
    Preset(
        "math-shepherd",
        "lm_pair",
        "pair_softmax0",
        "Math-Shepherd (model card): ' ки' after every step, softmax over ['+', '-']",
        TextTemplate(prompt="{encode_bos}{problem} ", step="{step} {tag}", between="{separator}"),
        tag="ки",
        candidates=("+", "-"),
        separator="\n",
        note="the model card's format; search-and-learn formats Math-Shepherd its own way: --preset math-shepherd-sal",
    ),
    Preset(
        "math-shepherd-sal",
        "lm_pair",
        "pair_softmax0",
        "Math-Shepherd as search-and-learn calls it: system prompt, ' ки' after every step, '\\n\\n' between",
        TextTemplate(prompt="{encode_bos}{system}\n{problem}\n ", step="{step} {tag}", between="{separator}"),
        tag="ки",
        candidates=("+", "-"),
        separator="\n\n",
        system_prompt=SAL_SYSTEM,
    ),
    Preset(
        "rlhflow",
        "lm_pair",
        "pair_softmax0",
        "RLHFlow PRM: chat turns, read before each assistant '+', softmax over ['+', '-']",
        ChatTemplate("turn_per_step"),
        candidates=("+", "-"),
        system_prompt="",
    ),
    Preset(
        "skywork",
        "value_head",
        "sigmoid",
        "Skywork-o1-Open-PRM: newline id after every step, sigmoid(v_head)",
        TextTemplate(prompt="{bos}{problem}\n{break}", step="{step}{break}{tag_id}"),
        tag="\n",
    ),
    Preset(
        "orm",
        "seq_cls",
        "by_labels",
        "outcome reward model: whole solution, last token",
        ChatTemplate("whole_solution", fallback=TextTemplate(prompt="{bos}{problem}\n", step="{solution}")),
        separator="\n\n",
        system_prompt="",
    ),
)
PRESETS: dict[str, Preset] = {p.name: p for p in PRESET_LIST}
# the preset --family alone picks when detection finds a preset of another family
DEFAULT_PRESET: dict[str, str] = {"token_cls": "trl", "lm_pair": "math-shepherd", "value_head": "skywork", "seq_cls": "orm"}


# --- detection -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What detection may look at: read once from config.json, the weights' names and the tokenizer."""

    architecture: str
    model_type: str
    weight_names: Sequence[str]
    chat_template: str | None
    single_token: Callable[[str], bool]  # does the tokenizer encode this text as one token?


@dataclass(frozen=True)
class Rule:
    """A detection rule: every condition given must hold; the first rule that matches names the preset."""

    preset: str
    architecture_suffix: str | None = None
    weight_suffix: str | None = None
    model_type: str | None = None
    single_token: str | None = None
    template_contains: str | None = None

    def matches(self, facts: ModelFacts) -> bool:
        return (
            (self.architecture_suffix is None or facts.architecture.endswith(self.architecture_suffix))
            and (self.weight_suffix is None or any(n.endswith(self.weight_suffix) for n in facts.weight_names))
            and (self.model_type is None or facts.model_type == self.model_type)
            and (self.template_contains is None or self.template_contains in (facts.chat_template or ""))
            and (self.single_token is None or facts.single_token(self.single_token))
        )


RULES: tuple[Rule, ...] = (
    Rule("qwen-prm", architecture_suffix="ForProcessRewardModel"),
    Rule("skywork", architecture_suffix="ForPrmModel"),
    Rule("skywork", weight_suffix="v_head.summary.weight"),
    Rule("trl", architecture_suffix="ForTokenClassification"),
    Rule("orm", architecture_suffix="ForSequenceClassification"),
    # Math-Shepherd's tag is one token of its Mistral vocabulary; detection gives the model card's format
    # (search-and-learn's is --preset math-shepherd-sal)
    Rule("math-shepherd", architecture_suffix="ForCausalLM", model_type="mistral", single_token="ки"),
    Rule("rlhflow", architecture_suffix="ForCausalLM", template_contains="<|start_header_id|>"),
)
# architectures that match no rule but that a flag can make exportable: what to say
UNDETECTED: dict[str, str] = {
    "ForCausalLM": "is a causal LM: say how it scores steps, e.g. --preset math-shepherd or --preset rlhflow, "
    "or --family lm_pair --tag TAG --candidates GOOD BAD",
}


def detect(facts: ModelFacts) -> Preset:
    for rule in RULES:
        if rule.matches(facts):
            return PRESETS[rule.preset]
    for suffix, message in UNDETECTED.items():
        if facts.architecture.endswith(suffix):
            raise ExportError(f"{facts.architecture} {message}")
    raise ExportError(
        f"architecture {facts.architecture or '(none in config.json)'} is not a PRM stepscore recognises; pass "
        f"--preset ({', '.join(PRESETS)}) or --family (token_cls, lm_pair, value_head, seq_cls)"
    )


def choose(facts: ModelFacts, preset: str | None, family: str | None) -> Preset:
    """The preset named, else the one detected (when --family agrees), else --family's default preset."""
    if preset is not None:
        if preset not in PRESETS:
            raise ExportError(f"--preset {preset!r} is not one of: {', '.join(PRESETS)}")
        chosen = PRESETS[preset]
        if family is not None and family != chosen.family:
            raise ExportError(f"--preset {chosen.name} is family {chosen.family}, not --family {family}")
        return chosen
    if family is not None:
        if family not in DEFAULT_PRESET:
            raise ExportError(f"--family {family!r} is not one of: {', '.join(DEFAULT_PRESET)}")
        try:
            detected = detect(facts)
            if detected.family == family:
                return detected
        except ExportError:
            pass
        return PRESETS[DEFAULT_PRESET[family]]
    return detect(facts)


# --- options -------------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(\\|n|t)")


def unescape(text: str) -> str:
    r"""`\n` and `\t` typed on a command line (bash does not turn them into newlines and tabs inside double
    quotes) -> newline and tab; `\\` -> one backslash. Every other backslash stays, so LaTeX such as
    `\boxed{}` passes unchanged (write `\\n` for a backslash followed by n, as in `\\neq`)."""
    return _ESCAPE.sub(lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], text)


def default_precision(device: str) -> Precision:
    """fp32 for CPU serving (onnxruntime's CPU kernels are fastest in fp32), fp16 for CUDA."""
    return "fp16" if device.startswith("cuda") else "fp32"


@dataclass(frozen=True)
class ExportOptions:
    """What the user can override; `None` means: take it from the model."""

    preset: str | None = None
    family: str | None = None
    tag: str | None = None
    candidates: tuple[str, str] | None = None
    system_prompt: str | None = None
    step_separator: str | None = None
    activation: str | None = None
    max_seq_len: int | None = None
    chat_template: bool = True

    def with_hints(self, model_dir: Path) -> ExportOptions:
        """Defaults from the model folder's `stepscore.json` (export options a model ships with), for
        every option the user left unset."""
        path = model_dir / "stepscore.json"
        if not path.is_file():
            return self
        try:
            hints: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{path}: not readable JSON ({exc})") from exc
        known = {f.name for f in fields(self)}
        unknown = set(hints) - known
        if unknown:
            raise ExportError(f"{path}: unknown export options {sorted(unknown)}; known: {sorted(known)}")
        if "candidates" in hints and hints["candidates"] is not None:
            hints["candidates"] = tuple(hints["candidates"])
        unset = {k: v for k, v in hints.items() if getattr(self, k) is None}
        return replace(self, **unset)

    def check_against(self, preset: Preset, has_chat_template: bool) -> None:
        """Refuse options the preset's format has no place for: an option that is silently ignored gives
        scores of another format than the user asked for."""
        uses_chat = isinstance(preset.template, ChatTemplate) and has_chat_template and self.chat_template
        has_system = preset.system_prompt is not None and (
            uses_chat or "{system}" in _template_text(preset.template, uses_chat)
        )
        if self.system_prompt is not None and not has_system:
            hint = " (search-and-learn's format has one: --preset math-shepherd-sal)" if preset.family == "lm_pair" else ""
            raise ExportError(f"--system-prompt: the {preset.name} format has no system prompt{hint}")
        if self.step_separator is not None and preset.separator is None:
            what = "a tag after each step: use --tag" if preset.tag is not None else "no step separator"
            raise ExportError(f"--step-separator: the {preset.name} format has {what}")
        if self.tag is not None and preset.tag is None:
            raise ExportError(f"--tag: the {preset.name} format has no step tag")
        if self.candidates is not None and preset.candidates is None:
            raise ExportError(f"--candidates: the {preset.name} format compares no candidate tokens (family {preset.family})")


def _template_text(template: TextTemplate | ChatTemplate, uses_chat: bool) -> str:
    text = template if isinstance(template, TextTemplate) else None if uses_chat else template.fallback
    return "" if text is None else text.prompt + text.step + text.between
