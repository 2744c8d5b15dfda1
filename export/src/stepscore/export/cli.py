"""`stepscore export MODEL OUT`: arguments, then `pipeline.export_model`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stepscore.errors import ExportError
from stepscore.export.presets import PRESETS, ExportOptions


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="turn a trained PRM into a validated, optimized ONNX bundle",
        description="Export a Hugging Face PRM (local folder or hub id) into a bundle directory: fused ONNX graph, "
        "tokenizer and manifest.json. The family and format are detected from config.json; the options "
        "below override them. Every export ends in validation against the PyTorch reference.",
    )
    p.add_argument("model", help="model folder (config.json, weights, tokenizer) or a hub id such as org/name")
    p.add_argument("out", type=Path, help="bundle directory to write")
    p.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        default="fp16",
        help="graph precision (fp16 for GPUs; fp32 is faster on CPUs). Default: fp16",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="the model line, when detection is not enough")
    p.add_argument("--family", choices=("token_cls", "lm_pair", "value_head", "seq_cls"), help="how step scores are read out")
    p.add_argument("--tag", help="step tag (token_cls/lm_pair/value_head): e.g. '<extra_0>' or 'ки'")
    p.add_argument(
        "--candidates",
        nargs=2,
        metavar=("GOOD", "BAD"),
        help="lm_pair: the two tokens whose logits are compared (default: + -)",
    )
    p.add_argument("--system-prompt", help="chat formats: system message (qwen-prm default: the Qwen-Math one)")
    p.add_argument("--step-separator", help="trl/skywork: separator after each step; orm: joins the steps")
    p.add_argument("--activation", choices=("identity", "sigmoid"), help="seq_cls with one label: reward transform")
    p.add_argument("--max-seq-len", type=int, help="longest candidate in tokens (default: the model's limit)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder or tokenizer.json, if not in the model folder")
    p.add_argument("--no-chat-template", action="store_true", help="orm: do not use the tokenizer's chat template")
    p.add_argument(
        "--external-data", action="store_true", help="store weights in model.onnx.data even when small (always on past 256 MB)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
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
    export_model(
        args.model,
        args.out,
        options,
        precision=args.precision,
        tokenizer=args.tokenizer,
        force=args.force,
        external_data=True if args.external_data else None,
    )
    return 0
