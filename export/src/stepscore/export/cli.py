"""`stepscore export MODEL OUT`: arguments, then `pipeline.export_model`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stepscore.errors import ExportError
from stepscore.export.presets import PRESETS, ExportOptions, default_precision, unescape
from stepscore.runtime.flags import add_flag, add_switch

ESCAPES = "\\n and \\t are read as newline and tab, \\\\ as one backslash"


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="turn a trained PRM into a validated, optimized ONNX bundle",
        description="Export a Hugging Face PRM (local folder or hub id) into a bundle directory: fused ONNX graph "
        "(its weights in one model.onnx.data file, shared by both graphs), tokenizer and manifest.json. The family "
        "and format are detected from config.json; the options below override them. Every export ends in "
        "validation against the PyTorch reference. Every option can also be set by the environment variable "
        "its help names.",
    )
    p.add_argument("model", metavar="MODEL", help="model folder (config.json, weights, tokenizer) or a hub id such as org/name")
    p.add_argument("out", metavar="OUT", type=Path, help="bundle directory to write (--force replaces a bundle there)")
    g = p.add_argument_group("target")
    add_flag(g, "--device", "cpu", str, "where the bundle will be served (cpu, cuda, cuda:N): chooses the precision")
    add_flag(
        g,
        "--precision",
        None,
        str,
        "graph precision",
        choices=("fp16", "fp32"),
        shown="fp32 for --device cpu (faster on CPUs), fp16 for cuda",
    )
    add_flag(g, "--max-seq-len", None, int, "longest candidate in tokens", shown="the model's limit")
    f = p.add_argument_group("format (what detection cannot know)")
    add_flag(f, "--preset", None, str, "the model line, when detection is not enough", choices=sorted(PRESETS))
    add_flag(
        f, "--family", None, str, "how step scores are read out", choices=("token_cls", "lm_pair", "value_head", "seq_cls")
    )
    add_flag(f, "--tag", None, unescape, "step tag (qwen-prm, math-shepherd, skywork): e.g. '<extra_0>' or 'ки'")
    add_flag(
        f,
        "--candidates",
        None,
        str,
        "lm_pair: the two tokens whose logits are compared",
        nargs=2,
        metavar=("GOOD", "BAD"),
        shown="+ -",
    )
    add_flag(
        f,
        "--system-prompt",
        None,
        unescape,
        f"system prompt, for formats that have one (qwen-prm, math-shepherd-sal, rlhflow, orm with a chat "
        f"template); refused by the others. {ESCAPES}",
        shown="the preset's",
    )
    add_flag(
        f,
        "--step-separator",
        None,
        unescape,
        f"trl: appended to each step (default: the one the checkpoint's saved training arguments name, else \\n); "
        f"math-shepherd(-sal): between steps; orm: joins the steps. {ESCAPES}",
        shown="the preset's",
    )
    add_flag(f, "--activation", None, str, "seq_cls with one label: reward transform", choices=("identity", "sigmoid"))
    add_flag(f, "--tokenizer", None, Path, "tokenizer folder or tokenizer.json, if not in the model folder")
    add_switch(f, "--no-chat-template", "orm: do not use the tokenizer's chat template")
    add_switch(p, "--force", "replace OUT if it is a stepscore bundle (any other existing folder is refused)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from stepscore.export.pipeline import export_model
    except ImportError as exc:
        raise ExportError(f"export needs the export extra ({exc.name} is missing): pip install 'stepscore[export]'") from exc

    options = ExportOptions(
        preset=args.preset,
        family=args.family,
        tag=args.tag,
        candidates=tuple(args.candidates) if args.candidates else None,
        system_prompt=args.system_prompt,
        step_separator=args.step_separator,
        activation=args.activation,
        max_seq_len=args.max_seq_len,
        chat_template=not args.no_chat_template,
    )
    precision = args.precision or default_precision(args.device)
    why = "given" if args.precision else f"chosen for --device {args.device}; pass --precision to change it"
    print(f"precision {precision} ({why})", flush=True)
    export_model(args.model, args.out, options, precision=precision, tokenizer=args.tokenizer, force=args.force)
    return 0
