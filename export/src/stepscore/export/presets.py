"""Presets and export options: light definitions the CLI can import without torch or onnx."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

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

    def with_hints(self, model_dir: Path) -> ExportOptions:
        """Defaults from the model folder's `stepscore.json` (export options a model ships with), for
        every option the user left unset."""
        path = model_dir / "stepscore.json"
        if not path.is_file():
            return self
        from stepscore.errors import ExportError

        try:
            hints: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ExportError(f"{path}: not JSON ({exc})") from exc
        known = {f.name for f in fields(self)}
        unknown = set(hints) - known
        if unknown:
            raise ExportError(f"{path}: unknown export options {sorted(unknown)}; known: {sorted(known)}")
        if "candidates" in hints and hints["candidates"] is not None:
            hints["candidates"] = tuple(hints["candidates"])
        unset = {k: v for k, v in hints.items() if getattr(self, k) is None}
        return replace(self, **unset)
