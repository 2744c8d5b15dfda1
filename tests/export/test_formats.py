"""Each format against its peer's own formatting code, re-implemented here line for line (no network), with
the real tokenizers in ../shared/tokenizers (skipped, saying why, when absent).

Peers: TRL `PRMTrainer.tokenize_row`, search-and-learn's `MathShepherd.score` and `RLHFFlow._score_batched`,
Skywork's `prepare_input`, the Qwen2.5-Math-PRM model card. Every case includes an empty step, which every
peer scores (its tag follows the previous one), and the bundle's format description is checked against what
it must say.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from stepscore.errors import ExportError
from stepscore.export.families import ModelPlan, plan_export
from stepscore.export.presets import SAL_SYSTEM, ExportOptions
from stepscore.export.tokenizer import load_tokenizer
from stepscore.export.weights import WeightStore
from stepscore.runtime.formatting import Formatter
from stepscore.runtime.types import Formatted, ScoreRequest

PROBLEM = "Janet has 3 apples. She buys 2 more:\n\nhow many does she have?"
# search-and-learn sends whole completions and splits them on "\n\n": the blank-line run makes an empty step
COMPLETION = "She starts with 3 apples.\n\nShe buys 2 more, so 3 + 2 = 5.\n\n\n\nThe answer is $\\boxed{5}$."
STEPS = COMPLETION.split("\n\n")
assert STEPS[2] == ""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, real_tokenizer: Callable[[str], Path]) -> Callable[[str, str], Path]:
    """model(kind, tokenizer) -> a tiny model folder of that family with a real tokenizer."""
    from tests.helpers.tiny_models import build

    root = tmp_path_factory.mktemp("formats")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, tokenizer: str) -> Path:
        if (kind, tokenizer) not in made:
            made[kind, tokenizer] = build(
                kind, root / f"{kind}-{tokenizer}", tokenizer_dir=real_tokenizer(tokenizer), hidden=16
            )
        return made[kind, tokenizer]

    return get


def _plan(folder: Path, **options: Any) -> ModelPlan:
    return plan_export(folder, load_tokenizer(folder), WeightStore(folder), ExportOptions(**options))


def _format(folder: Path, plan: ModelPlan, steps: Sequence[str], problem: str = PROBLEM) -> Formatted:
    formatter = Formatter(plan.format, folder / "tokenizer.json", plan.decoder.vocab_size, plan.max_seq_len)
    return formatter.format_request(ScoreRequest(problem, [list(steps)]))[0]


def _hf(folder: Path) -> Any:
    """The tokenizer as the peers load it (AutoTokenizer's fast class from the same files)."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    make: Any = PreTrainedTokenizerFast  # untyped constructor
    return make(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=cfg.get("bos_token"),
        eos_token=cfg.get("eos_token"),
        chat_template=cfg.get("chat_template"),
    )


# --- TRL -----------------------------------------------------------------------------------------


def trl_tokenize_row(
    tokenizer: Any, prompt: str, completions: Sequence[str], step_separator: str
) -> tuple[list[int], list[int]]:
    """PRMTrainer.tokenize_row: (input_ids, positions of the labelled tokens)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completions_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [c + separator_ids for c in completions_ids]
    labels = [[-100] * (len(c) - 1) + [1] for c in completions_ids]  # a label on each step's last token
    completion_ids = list(chain(*completions_ids))
    flat_labels = list(chain(*labels))
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    input_ids = prompt_ids + completion_ids
    flat_labels = [-100] * len(prompt_ids) + flat_labels
    return input_ids, [i for i, label in enumerate(flat_labels) if label != -100]


@dataclasses.dataclass
class PRMConfig:
    """Stands for trl's PRMConfig in a saved training_args.bin (the reader never imports the class)."""

    output_dir: str
    step_separator: str = "\n"
    learning_rate: float = 1e-5


def test_trl_separator_from_training_args_matches_tokenize_row(model: Callable[[str, str], Path]) -> None:
    import torch

    folder = model("trl", "qwen2.5-math-prm")
    plan = _plan(folder)
    assert plan.warnings and "a guess" in plan.warnings[0]  # nothing says which separator: said, not hidden
    torch.save(PRMConfig(output_dir="out", step_separator="\n\n"), folder / "training_args.bin")
    try:
        plan = _plan(folder)
    finally:
        (folder / "training_args.bin").unlink()
    assert not plan.warnings and any("training_args.bin (step_separator)" in n for n in plan.notes)
    got = _format(folder, plan, STEPS)
    want_ids, want_reads = trl_tokenize_row(_hf(folder), PROBLEM, STEPS, "\n\n")
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_array_equal(got.reads, want_reads)
    assert 'each step: step | [271 "ĊĊ"] (score read here)' in plan.format.description


# --- search-and-learn: Math-Shepherd -------------------------------------------------------------

STEP_TAG_ID = 12902  # search-and-learn's constant


def sal_math_shepherd(tokenizer: Tokenizer, system_prompt: str, question: str, output: str) -> tuple[list[int], list[int]]:
    """MathShepherd.score's input for one completion, and where batched_math_shepherd_inference reads."""
    prompt = system_prompt + "\n" + question + "\n"
    special = output.replace("\n\n", " ки\n\n")
    special = special + " ки" if special[-2:] != "\n\n" else special
    ids = tokenizer.encode(f"{prompt} {special}").ids  # tokenizer(text): with the BOS
    return ids, [i for i, t in enumerate(ids) if t == STEP_TAG_ID]


@pytest.mark.parametrize("system", [None, "You check maths.\nBe strict."])
def test_math_shepherd_sal_matches_search_and_learn(model: Callable[[str, str], Path], system: str | None) -> None:
    folder = model("math-shepherd", "mistral-7b-v0.1-spm")
    plan = _plan(folder, preset="math-shepherd-sal", system_prompt=system)
    got = _format(folder, plan, STEPS)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    want_ids, want_reads = sal_math_shepherd(reference, SAL_SYSTEM if system is None else system, PROBLEM, COMPLETION)
    assert len(want_reads) == len(STEPS)  # the empty step has its tag
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_array_equal(got.reads, want_reads)
    assert 'between steps: "\\n\\n"' in plan.format.description
    assert '+ " ки" (score read here, id 12902)' in plan.format.description


def test_math_shepherd_card_with_another_separator(model: Callable[[str, str], Path]) -> None:
    folder = model("math-shepherd", "mistral-7b-v0.1-spm")
    plan = _plan(folder, step_separator="\n\n")
    got = _format(folder, plan, STEPS)
    # the model card's format with the separator asked for: question + " " + " ки\n\n".join(steps) + " ки"
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROBLEM + " " + " ки\n\n".join(STEPS) + " ки").ids
    np.testing.assert_array_equal(got.ids, want)
    np.testing.assert_array_equal(got.reads, [i for i, t in enumerate(want) if t == STEP_TAG_ID])
    # before, the description still said " ки\n" whatever the separator
    assert 'between steps: "\\n\\n"' in plan.format.description and '"\\n"' not in plan.format.description


# --- search-and-learn: RLHFlow -------------------------------------------------------------------


def sal_rlhflow(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """RLHFFlow._score_batched for one answer: the "+" conversation's ids, and the positions read (one before
    each assistant turn, found through the parallel conversation whose assistant turns are "ки")."""
    special_tok_id = tokenizer("ки", return_tensors=None)["input_ids"][1]
    conversation, conversation2 = [], []
    for k, text in enumerate(answer.split("\n\n")):
        text = question + " " + text if k == 0 else text
        conversation += [{"content": text, "role": "user"}, {"content": "+", "role": "assistant"}]
        conversation2 += [{"content": text, "role": "user"}, {"content": "ки", "role": "assistant"}]
    ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
    ids2 = list(tokenizer.apply_chat_template(conversation2, tokenize=True, return_dict=False))
    assert len(ids) == len(ids2)
    return ids, [i for i in range(len(ids2) - 1) if ids2[i + 1] == special_tok_id]


def test_rlhflow_matches_search_and_learn(model: Callable[[str, str], Path]) -> None:
    folder = model("rlhflow", "llama3.1")
    plan = _plan(folder)
    got = _format(folder, plan, STEPS)
    want_ids, want_reads = sal_rlhflow(_hf(folder), PROBLEM, COMPLETION)
    assert len(want_reads) == len(STEPS)
    np.testing.assert_array_equal(got.reads, want_reads)
    np.testing.assert_array_equal(got.ids, want_ids[: want_reads[-1] + 1])  # nothing after the last read counts
    assert '"+" (score read at the token before it, id 10)' in plan.format.description


# --- Skywork and the Qwen PRM model card -----------------------------------------------------------


def skywork_prepare_input(tokenizer: Any, problem: str, response: str, step_token: str = "\n") -> tuple[list[int], list[int]]:
    """Skywork's prepare_input: tok(bos + problem + "\\n"), then tok(step) + [step token id] per step (an empty
    step still gets its flag)."""
    prompt_ids = tokenizer.encode((tokenizer.bos_token or "") + problem + "\n")
    step_token_id = tokenizer.encode(step_token)[-1]
    ids, flags = list(prompt_ids), []
    for step in response.split(step_token):
        step_ids = tokenizer.encode(step) if step != "" else []
        ids += [*step_ids, step_token_id]
        flags.append(len(ids) - 1)
    return ids, flags


def test_skywork_matches_prepare_input(model: Callable[[str, str], Path]) -> None:
    folder = model("skywork", "qwen2.5-math-prm")
    plan = _plan(folder)
    steps = ["She starts with 3 apples.", "", "3 + 2 = 5, so $\\boxed{5}$."]
    got = _format(folder, plan, steps)
    want_ids, want_reads = skywork_prepare_input(_hf(folder), PROBLEM, "\n".join(steps))
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_array_equal(got.reads, want_reads)


def test_qwen_prm_with_a_system_prompt_and_an_empty_step(model: Callable[[str, str], Path]) -> None:
    folder = model("qwen-prm", "qwen2.5-math-prm")
    plan = _plan(folder, system_prompt="Check each step.")
    got = _format(folder, plan, STEPS)
    # the model card: chat template with assistant = "<extra_0>".join(steps) + "<extra_0>"
    messages = [
        {"role": "system", "content": "Check each step."},
        {"role": "user", "content": PROBLEM},
        {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"},
    ]
    want = np.array(_hf(folder).apply_chat_template(messages, tokenize=True, return_dict=False))
    reads = np.flatnonzero(want == 151651)
    assert len(reads) == len(STEPS)
    np.testing.assert_array_equal(got.ids, want[: reads[-1] + 1])
    np.testing.assert_array_equal(got.reads, reads)
    assert "Check each step." in plan.format.description


# --- options a format has no place for --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "tokenizer", "options", "message"),
    [
        ("trl", "qwen2.5-math-prm", {"system_prompt": "x"}, "the trl format has no system prompt"),
        ("math-shepherd", "mistral-7b-v0.1-spm", {"system_prompt": "x"}, "--preset math-shepherd-sal"),
        ("skywork", "qwen2.5-math-prm", {"system_prompt": "x"}, "the skywork format has no system prompt"),
        ("skywork", "qwen2.5-math-prm", {"step_separator": "\n\n"}, "use --tag"),
        ("qwen-prm", "qwen2.5-math-prm", {"step_separator": "\n\n"}, "use --tag"),
        ("rlhflow", "llama3.1", {"tag": "ки"}, "the rlhflow format has no step tag"),
        ("trl", "qwen2.5-math-prm", {"candidates": ("+", "-")}, "compares no candidate tokens"),
    ],
)
def test_options_without_a_place_in_the_format_are_refused(
    model: Callable[[str, str], Path], kind: str, tokenizer: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        _plan(model(kind, tokenizer), **options)
