"""Presets and export options: light definitions the CLI can import without torch or onnx."""

from __future__ import annotations

from dataclasses import dataclass

from stepscore.runtime.bundle import Family


@dataclass(frozen=True)
class Preset:
    name: str
    family: Family
    summary: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen-prm", "token_cls", "Qwen2.5-Math-PRM: chat template, <extra_0> after every step, softmax[1]"),
        Preset("trl", "token_cls", "TRL PRMTrainer output: prompt, tok(step)+tok(separator), softmax[1]"),
        Preset("math-shepherd", "lm_pair", "Math-Shepherd: ' ки' after every step, softmax over ['+', '-']"),
        Preset("rlhflow", "lm_pair", "RLHFlow PRM: chat turns, read before each assistant '+', softmax over ['+', '-']"),
        Preset("skywork", "value_head", "Skywork-o1-Open-PRM: newline after every step, sigmoid(v_head)"),
        Preset("orm", "seq_cls", "outcome reward model: whole solution, last token"),
    )
}
DEFAULT_PRESET: dict[str, str] = {
    "token_cls": "trl",
    "lm_pair": "math-shepherd",
    "value_head": "skywork",
    "seq_cls": "orm",
}


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
