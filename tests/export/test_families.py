"""Family detection and the one-line errors for what export cannot do."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.errors import ExportError
from stepscore.export.families import choose_preset, plan_export, read_config
from stepscore.export.presets import ExportOptions
from stepscore.export.tokenizer import load_tokenizer
from stepscore.export.weights import WeightStore

EXPECTED = {
    "qwen-prm": ("qwen-prm", "token_cls"),
    "trl": ("trl", "token_cls"),
    "qwen3-trl": ("trl", "token_cls"),
    "math-shepherd": ("math-shepherd", "lm_pair"),
    "rlhflow": ("rlhflow", "lm_pair"),
    "skywork": ("skywork", "value_head"),
    "orm": ("orm", "seq_cls"),
}


def _plan(folder: Path, **opts: object):  # type: ignore[no-untyped-def]
    return plan_export(folder, load_tokenizer(folder), WeightStore(folder), ExportOptions(**opts))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_detects_family_from_config(tiny_model: Callable[[str], Path], kind: str) -> None:
    plan = _plan(tiny_model(kind))
    assert (plan.preset, plan.family) == EXPECTED[kind]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = read_config(folder)
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_says_what_to_pass(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    folder = _copy(tiny_model("trl"), tmp_path / "m")
    _edit_config(folder, architectures=["BertForMaskedLM"])
    with pytest.raises(ExportError, match="--preset"):
        _plan(folder)
    _edit_config(folder, architectures=["Qwen2ForTokenClassification"], model_type="gemma2")
    with pytest.raises(ExportError, match="model_type 'gemma2' is not supported"):
        _plan(folder)


def test_causal_lm_without_hints_asks_for_preset(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    folder = _copy(tiny_model("rlhflow"), tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="--preset math-shepherd or --preset rlhflow"):
        _plan(folder)
    plan = _plan(folder, preset="math-shepherd", tag="the")  # an explicit preset works
    assert plan.family == "lm_pair"


def test_missing_tokenizer_is_a_clear_error(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    folder = _copy(tiny_model("trl"), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ExportError, match=r"no tokenizer found.*--tokenizer"):
        load_tokenizer(folder)


def test_tag_and_candidates_must_be_single_tokens(tiny_model: Callable[[str], Path]) -> None:
    folder = tiny_model("math-shepherd")
    with pytest.raises(ExportError, match="not one; pass --tag"):
        _plan(folder, tag="zzqx")
    with pytest.raises(ExportError, match="not one; pass --candidates"):
        _plan(folder, candidates=("plus sign", "-"))
    with pytest.raises(ExportError, match="not a token of this tokenizer"):
        _plan(tiny_model("qwen-prm"), tag="<no_such_tag>")


def test_family_override_and_conflicts(tiny_model: Callable[[str], Path]) -> None:
    folder = tiny_model("trl")
    tok, weights = load_tokenizer(folder), WeightStore(folder)
    cfg = read_config(folder)
    assert choose_preset(cfg, tok, weights, ExportOptions(family="token_cls")).name == "trl"
    with pytest.raises(ExportError, match="is family token_cls"):
        choose_preset(cfg, tok, weights, ExportOptions(preset="qwen-prm", family="lm_pair"))
    with pytest.raises(ExportError, match="not one of"):
        choose_preset(cfg, tok, weights, ExportOptions(preset="nope"))


def test_max_seq_len_respects_sliding_window(tiny_model: Callable[[str], Path]) -> None:
    assert _plan(tiny_model("math-shepherd")).max_seq_len == 256  # Mistral's window, not its 512 positions
    with pytest.raises(ExportError, match="beyond the model's limit"):
        _plan(tiny_model("trl"), max_seq_len=100_000)


def test_presets_are_records_and_detection_reads_them() -> None:
    from stepscore.export import presets

    assert set(presets.PRESETS) == {p.name for p in presets.PRESET_LIST}
    assert {r.preset for r in presets.RULES} <= set(presets.PRESETS)
    assert set(presets.DEFAULT_PRESET.values()) <= set(presets.PRESETS)
    facts = presets.ModelFacts("MistralForCausalLM", "mistral", [], None, lambda text: text == "ки")
    assert presets.detect(facts).name == "math-shepherd"
    facts = presets.ModelFacts("LlamaForCausalLM", "llama", [], "<|start_header_id|>", lambda text: False)
    assert presets.detect(facts).name == "rlhflow"
    with pytest.raises(ExportError, match="is a causal LM"):
        presets.detect(presets.ModelFacts("GPT2ForCausalLM", "gpt2", [], None, lambda text: False))


def test_tokenizer_code_does_not_call_back_into_formats() -> None:
    import ast

    from stepscore.export import tokenizer

    tree = ast.parse(Path(tokenizer.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"stepscore.export.families", "stepscore.export.formats", "stepscore.export.presets"}


def test_command_line_escapes_are_unescaped() -> None:
    from stepscore.export.presets import unescape

    assert unescape("\\n\\n") == "\n\n" and unescape("a\\tb") == "a\tb"
    assert unescape("put it in \\boxed{}") == "put it in \\boxed{}"  # LaTeX passes unchanged
    assert unescape("\\\\neq") == "\\neq"  # a backslash written twice is one backslash
