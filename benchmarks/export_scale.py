"""Export time and peak memory on a real-sized model, written into benchmarks/RESULTS.md.

    python -m benchmarks.export_scale                 # Qwen2.5-0.5B-shaped PRM, fp16 graph, validated
    python -m benchmarks.export_scale --shape 1.5b    # Qwen2-1.5B-shaped (about 3 GB of bf16 weights)

Random bf16 weights in a Qwen2.5-Math-PRM layout are written to benchmarks/.cache, then `stepscore export`
runs in its own process (so its peak memory is its own) and its progress lines are recorded. The point:
weights stream from the checkpoint into the graph one tensor at a time, so the peak is about one fp32
copy of the model (the validation reference) plus the largest tensor, never two copies.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cpu_suite import CACHE, environment, log, write_section
from benchmarks.models import SHAPES, write_random_prm

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, shape: dict[str, int]) -> int:
    """The checkpoint (written once, cached) and its parameter count."""
    write_random_prm(folder, shape)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return sum(int(math.prod(f.get_slice(k).get_shape())) for k in f.keys())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    args = p.parse_args()
    folder = CACHE / f"export-{args.shape}"
    out = CACHE / f"export-{args.shape}-{args.precision}"
    params = build(folder, SHAPES[args.shape])
    log(f"{params / 1e9:.2f}B parameters; exporting")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "export", str(folder), str(out), "--precision", args.precision, "--force"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    log("\n".join(lines))
    if proc.returncode:
        log(proc.stderr[-3000:])
        return proc.returncode
    peak = float(re.search(r"peak memory ([\d,]+) MB", lines[-1]).group(1).replace(",", ""))  # type: ignore[union-attr]
    fp32_copy = params * 4 / 2**20
    data = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    body = f"""## Export: time and peak memory at {args.shape.upper()} scale (CPU)

{environment()}. Command: `python -m benchmarks.export_scale --shape {args.shape} --precision {args.precision}`.
A Qwen2-{args.shape.upper()}-shaped PRM ({params / 1e9:.2f}B parameters, random bf16 weights, Qwen2.5-Math-PRM layout)
exported to an {args.precision} graph, validated against the PyTorch fp32 reference as every export is.

| | |
|---|---|
| wall time (whole command) | {wall:.0f} s |
| peak memory (export process) | {peak:,.0f} MB |
| one fp32 copy of the model (the validation reference) | {fp32_copy:,.0f} MB |
| bundle on disk | {data:,.0f} MB |

```
{chr(10).join(lines)}
```
"""
    write_section(f"export-{args.shape}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
