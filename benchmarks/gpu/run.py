"""All GPU checks in one run: build a Qwen2-1.5B-shaped PRM, export it, and measure.

    python -m benchmarks.gpu.run --out $OUT                 # on the GPU machine (see benchmarks/gpu/NOTES.md)
    python -m benchmarks.gpu.run --tiny --device cpu --out /tmp/gpu-smoke   # smoke test of the script on a CPU

Sections (each prints a short table; `--only` picks some):

- `plain`   PyTorch eager (fp16, SDPA) vs the exported graphs (onnxruntime CUDA EP, IO binding) on plain
            batches B x S = 64x512, 16x2048, 256x128: the tree graph (MultiHeadAttention + bias) and the
            plain-row graph (GroupQueryAttention, no bias): tokens/s, TFLOP/s, ratios, max |diff| of step
            scores (issues: export, GPU speed);
- `sharing` N candidates of C tokens after a P-token prefix: padded batch (PyTorch, ORT) vs one packed
            tree row (ORT): tokens computed, tokens/s and time ratios, max |diff| (issue: shared prefixes);
- `serve`   the benchmark harness on synthetic Best-of-N and beam workloads: engine in-process, gRPC
            service, naive onnxruntime loop, PyTorch eager padded batches of 8 (issue: benchmarks).

Random weights: the speed of a 1.5B PRM does not depend on what it learned. TFLOP/s counts
2 x (parameters without the embedding table) x tokens / time, as performance.md does. Nothing here needs
the network. Results go to OUT/gpu.json and OUT/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import SHAPES as MODEL_SHAPES
from benchmarks.models import write_random_prm

ROOT = Path(__file__).resolve().parents[2]


SHAPES = {
    "1.5b": MODEL_SHAPES["1.5b"],
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=4096),
}  # fmt: skip
PLAIN = [(64, 512), (16, 2048), (256, 128)]
TINY_PLAIN = [(4, 64), (2, 128)]
SHARING = [(16, 512, 64), (64, 1024, 64), (8, 256, 128)]  # N candidates, prefix P, candidate C
TINY_SHARING = [(4, 32, 8)]
K = 8  # step positions read per row in the plain runs


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of `iters` runs after `warmup` runs, with device synchronisation."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- the model -------------------------------------------------------------------------------------


def body_params(shape: dict[str, int]) -> int:
    h, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + h + 2 * kv + 2 * h
    return layers * per_layer


class TorchPRM:
    """PyTorch eager: the HF body (SDPA) and the Qwen PRM head, the reference the graph is compared to."""

    def __init__(self, folder: Path, device: str, dtype: str) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import Qwen2Model

        self.torch = torch
        self.dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.device = device
        body_cls: Any = Qwen2Model  # from_pretrained's decorator is mistyped in transformers
        self.body = body_cls.from_pretrained(str(folder), dtype=self.dtype, attn_implementation="sdpa").to(device)
        self.body.eval()
        st = load_file(str(folder / "model.safetensors"))
        self.w = {
            k: st[k].to(device=device, dtype=torch.float32)
            for k in ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
        }

    def scores(self, ids: np.ndarray, reads: np.ndarray, mask: np.ndarray | None = None) -> Any:
        torch = self.torch
        with torch.no_grad():
            t_ids = torch.as_tensor(ids, device=self.device)
            m = None if mask is None else torch.as_tensor(mask, device=self.device)
            hidden = self.body(input_ids=t_ids, attention_mask=m).last_hidden_state
            rows = torch.arange(ids.shape[0], device=self.device)[:, None]
            x = hidden[rows, torch.as_tensor(reads, device=self.device)].float()
            x = torch.relu(x @ self.w["score.0.weight"].T + self.w["score.0.bias"])
            logits = x @ self.w["score.2.weight"].T + self.w["score.2.bias"]
            return torch.softmax(logits, -1)[..., 1]


def plain_batch(b: int, s: int, vocab: int, seed: int) -> Any:
    from stepscore.runtime.packing import PackOptions, pack
    from stepscore.runtime.types import Formatted

    rng = np.random.default_rng(seed)
    reads = np.linspace(s // K - 1, s - 1, K).astype(np.int32)
    items = [Formatted(rng.integers(10, vocab - 10, s).astype(np.int32), reads) for _ in range(b)]
    # laid out for the plain-row graph; with seq_lens dropped, the same rows run through the tree graph
    return pack(items, PackOptions(row_tokens=s, row_multiple=1, plain_cost=0.0))


# --- sections --------------------------------------------------------------------------------------


def section_plain(args: argparse.Namespace, folder: Path, bundle: Path, shape: dict[str, int]) -> list[dict[str, Any]]:
    import dataclasses

    from stepscore.runtime.backend import OrtBackend

    device = args.device
    # one backend, both graphs: a batch with seq_lens runs the plain-row graph, without them the tree graph
    ort = OrtBackend(bundle / "model.onnx", device, plain_graph_path=bundle / "model_plain.onnx")
    eager = TorchPRM(folder, device, "fp16" if device != "cpu" else "fp32")
    ref32 = TorchPRM(folder, device, "fp32")
    flops_per_token = 2 * body_params(shape)
    rows = []
    for b, s in TINY_PLAIN if args.tiny else PLAIN:
        plain = plain_batch(b, s, shape["vocab_size"], seed=b * s)
        tree = dataclasses.replace(plain, seq_lens=None)
        ids = plain.input_ids
        reads = plain.step_positions
        t_eager = timed(partial(eager.scores, ids, reads), device, iters=args.iters)
        t_ort = timed(partial(ort.run, tree), device, iters=args.iters)
        t_plain = timed(partial(ort.run, plain), device, iters=args.iters)
        got = ort.run(tree)
        got_plain = ort.run(plain)
        want16 = eager.scores(ids, reads).float().cpu().numpy()
        sub = slice(0, max(1, b // 8))  # the fp32 reference on a slice keeps memory and time small
        want32 = ref32.scores(ids[sub], reads[sub]).cpu().numpy()
        tokens = b * s
        rows.append({
            "B": b, "S": s,
            "eager_tok_s": tokens / t_eager, "eager_tflops": tokens * flops_per_token / t_eager / 1e12,
            "ort_tok_s": tokens / t_ort, "ort_tflops": tokens * flops_per_token / t_ort / 1e12,
            "plain_tok_s": tokens / t_plain, "plain_tflops": tokens * flops_per_token / t_plain / 1e12,
            "ratio": t_eager / t_ort, "plain_ratio": t_eager / t_plain,
            "max_diff_vs_eager_fp16": float(np.abs(got - want16).max()),
            "max_diff_vs_fp32": float(np.abs(got[sub] - want32).max()),
            "plain_max_diff_vs_fp32": float(np.abs(got_plain[sub] - want32).max()),
        })  # fmt: skip
        r = rows[-1]
        log(
            f"  {b:>4}x{s:<5} eager {r['eager_tok_s']:>10,.0f} tok/s {r['eager_tflops']:6.1f} TF/s | "
            f"tree {r['ort_tok_s']:>10,.0f} tok/s {r['ort_tflops']:6.1f} TF/s x{r['ratio']:.2f} | "
            f"plain {r['plain_tok_s']:>10,.0f} tok/s {r['plain_tflops']:6.1f} TF/s x{r['plain_ratio']:.2f} | "
            f"|d| fp16 {r['max_diff_vs_eager_fp16']:.1e} fp32 {r['max_diff_vs_fp32']:.1e} "
            f"plain fp32 {r['plain_max_diff_vs_fp32']:.1e}"
        )
    return rows


def section_sharing(args: argparse.Namespace, folder: Path, bundle: Path, shape: dict[str, int]) -> list[dict[str, Any]]:
    from stepscore.runtime.backend import OrtBackend
    from stepscore.runtime.packing import PackOptions, pack
    from stepscore.runtime.types import Formatted

    device = args.device
    ort = OrtBackend(bundle / "model.onnx", device)
    eager = TorchPRM(folder, device, "fp16" if device != "cpu" else "fp32")
    rows = []
    rng = np.random.default_rng(1)
    for n, p, c in TINY_SHARING if args.tiny else SHARING:
        prefix = rng.integers(10, shape["vocab_size"] - 10, p).astype(np.int32)
        items = [
            Formatted(
                np.concatenate([prefix, rng.integers(10, shape["vocab_size"] - 10, c).astype(np.int32)]),
                np.array([p - 1, p + c - 1], np.int32),
            )
            for _ in range(n)
        ]
        padded = pack(items, PackOptions(share_prefixes=False, pack_rows=False, row_tokens=p + c, row_multiple=1))
        tree = pack(items, PackOptions(share_prefixes=True, row_tokens=max(4096, n * c + p), row_multiple=64))
        t_pad_eager = timed(partial(eager.scores, padded.input_ids, padded.step_positions), device, iters=args.iters)
        t_pad = timed(partial(ort.run, padded), device, iters=args.iters)
        t_tree = timed(partial(ort.run, tree), device, iters=args.iters)
        a = ort.run(padded).reshape(-1)
        t = ort.run(tree).reshape(-1)
        diff = max(float(np.abs(a[x] - t[y]).max()) for x, y in zip(padded.item_reads, tree.item_reads, strict=True))
        rows.append({
            "N": n, "P": p, "C": c, "tokens_padded": padded.tokens_computed, "tokens_tree": tree.tokens_computed,
            "eager_padded_s": t_pad_eager, "ort_padded_s": t_pad, "ort_tree_s": t_tree,
            "speedup_vs_eager_padded": t_pad_eager / t_tree, "speedup_vs_ort_padded": t_pad / t_tree,
            "max_diff": diff,
        })  # fmt: skip
        r = rows[-1]
        log(
            f"  {n}x{p}x{c}: tokens {r['tokens_padded']:,} -> {r['tokens_tree']:,}; tree row "
            f"x{r['speedup_vs_eager_padded']:.2f} vs eager padded, x{r['speedup_vs_ort_padded']:.2f} vs ORT padded; "
            f"|d| {diff:.1e}"
        )
    return rows


def section_serve(args: argparse.Namespace, folder: Path, bundle: Path, out: Path) -> dict[str, Any]:
    """The benchmark harness (stepscore bench) on synthetic Best-of-N and beam traffic."""
    cmd = [
        sys.executable, "-m", "stepscore.cli", "bench", str(bundle), "--hf-model", str(folder), "--serve",
        "--workload", "synthetic,synthetic-beam", "--limit", str(16 if args.tiny else 96),
        "--concurrency", "1,16,64", "--rate-fractions", "", "--warmup", "4", "--device", args.device,
        "--max-batch-tokens", str(4096 if args.tiny else 65536), "--out", str(out / "bench"),
    ] + (["--synthetic-scale", "0.1"] if args.tiny else [])  # fmt: skip
    log("  " + " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.serve_timeout)
    log(proc.stdout[-6000:])
    if proc.returncode:
        log(proc.stderr[-4000:])
    results = out / "bench" / "results.json"
    return json.loads(results.read_text()) if results.is_file() else {"error": proc.stderr[-2000:]}


def markdown(report: dict[str, Any]) -> str:
    """The plain and sharing tables for benchmarks/RESULTS.md (serve writes its own, under bench/)."""
    lines = [f"{report.get('gpu', report['device'])}, onnxruntime {report.get('onnxruntime')}, torch {report.get('torch')}", ""]
    if report.get("plain"):
        lines += [
            "| B x S | eager tok/s (TF/s) | tree graph tok/s (TF/s) | x eager | plain graph tok/s (TF/s) | x eager "
            "| max abs diff vs fp32 (tree / plain) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["plain"]:
            lines.append(
                f"| {r['B']}x{r['S']} | {r['eager_tok_s']:,.0f} ({r['eager_tflops']:.0f}) | {r['ort_tok_s']:,.0f} "
                f"({r['ort_tflops']:.0f}) | {r['ratio']:.2f} | {r['plain_tok_s']:,.0f} ({r['plain_tflops']:.0f}) | "
                f"{r['plain_ratio']:.2f} | {r['max_diff_vs_fp32']:.1e} / {r['plain_max_diff_vs_fp32']:.1e} |"
            )
        lines.append("")
    if report.get("sharing"):
        lines += [
            "| N x prefix x candidate | tokens padded -> tree | tree row vs eager padded | vs ORT padded | max abs diff |",
            "|---|---|---|---|---|",
        ]
        for r in report["sharing"]:
            lines.append(
                f"| {r['N']}x{r['P']}x{r['C']} | {r['tokens_padded']:,} -> {r['tokens_tree']:,} | "
                f"x{r['speedup_vs_eager_padded']:.2f} | x{r['speedup_vs_ort_padded']:.2f} | {r['max_diff']:.1e} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/stepscore-gpu"))
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--tiny", action="store_true", help="a tiny model and shapes: checks the script, not the GPU")
    p.add_argument("--only", default="plain,sharing,serve")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--serve-timeout", type=int, default=240)
    args = p.parse_args()
    if args.device.startswith("cuda"):
        import onnxruntime
        import torch  # loads CUDA before onnxruntime looks for it

        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()
    shape = SHAPES["tiny" if args.tiny else "1.5b"]
    args.out.mkdir(parents=True, exist_ok=True)
    folder, bundle = args.work / "model", args.work / "bundle"
    t0 = time.perf_counter()
    write_random_prm(folder, shape, device=args.device)
    log(f"model built in {time.perf_counter() - t0:.0f}s ({body_params(shape) / 1e9:.2f}B body parameters)")
    if not (bundle / "manifest.json").is_file():
        from stepscore.export.pipeline import export_model

        # parity is measured on the GPU below; the CPU gate would only cost minutes here
        export_model(str(folder), bundle, precision="fp16", force=True, validate=False, progress=lambda line: log("  " + line))
    report: dict[str, Any] = {"device": args.device, "shape": shape, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        report["torch"] = torch.__version__
        import onnxruntime
        import transformers

        report["onnxruntime"], report["transformers"] = onnxruntime.__version__, transformers.__version__
    except Exception as exc:  # noqa: BLE001 - the report still gets written
        report["versions_error"] = repr(exc)
    sections = set(args.only.split(","))
    if "plain" in sections:
        log("plain batches: PyTorch eager vs exported graph")
        report["plain"] = section_plain(args, folder, bundle, shape)
    if "sharing" in sections:
        log("shared prefixes: padded batch vs one tree row")
        report["sharing"] = section_sharing(args, folder, bundle, shape)
    if "serve" in sections:
        log("serving: stepscore bench on synthetic Best-of-N and beam traffic")
        report["serve"] = section_serve(args, folder, bundle, args.out)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu.md").write_text(markdown(report))
    log(f"done in {time.perf_counter() - t0:.0f}s; wrote {args.out / 'gpu.json'} and gpu.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
