"""`stepscore demo`: the whole product on the embedded model, in under a minute.

1. export   the shipped checkpoint -> a validated bundle (the export path users run on their PRMs);
2. serve    that bundle with `stepscore serve` in its own process;
3. search   best-of-N over gRPC: N chains per problem sampled from the noisy policy, scored on one
            stream; pick by the PRM's min step score, against majority vote and random choice;
4. stop     SIGTERM: the server drains and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from stepscore.errors import StepscoreError
from stepscore.runtime.default_model import default_checkpoint
from stepscore.runtime.default_model.arith import Chain, Problem, majority_vote
from stepscore.runtime.default_model.evaluate import held_out
from stepscore.runtime.flags import add_flag
from stepscore.runtime.types import ScoreRequest


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="export, serve and search with the embedded arithmetic PRM",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_flag(p, "--problems", 200, int, "held-out problems to search", scope="demo")
    add_flag(p, "--chains", 8, int, "chains sampled per problem", aliases=("-n",), scope="demo")
    add_flag(p, "--seed", 2026, int, "seed of the problems and chains", scope="demo")
    p.set_defaults(run=run_demo)


def _start_server(bundle: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "stepscore.cli", "serve", str(bundle), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if "ready on" in line:
            return proc, line.rsplit(" ", 1)[1].strip()
    proc.kill()
    raise StepscoreError("the demo server did not start:\n" + "".join(seen))


async def _search(target: str, data: list[tuple[Problem, list[Chain]]]) -> tuple[dict[str, list[list[float]]], float]:
    from stepscore.runtime.client import AsyncClient

    requests = [
        ScoreRequest(problem.text, [c.steps for c in chains], aggregates=("min",), request_id=f"p{i}")
        for i, (problem, chains) in enumerate(data)
    ]
    scores: dict[str, list[list[float]]] = {}
    started = time.perf_counter()
    async with AsyncClient(target) as client:
        async for item in client.score_stream(requests):
            if item.error is not None:
                raise item.error
            assert item.result is not None
            scores[item.request_id] = [c.step_scores for c in item.result.candidates]
    return scores, time.perf_counter() - started


def _show(problem: Problem, chains: list[Chain], scores: list[list[float]], out: Any) -> None:
    print(f"\n  problem {problem.text} = {problem.answer}", file=out)
    for chain, chain_scores in zip(chains, scores, strict=True):
        verdict = "right" if chain.first_error < 0 else f"first wrong step: {chain.first_error + 1}"
        print(f"    chain ({verdict}), min score {min(chain_scores):.3f}", file=out)
        for k, (step, s) in enumerate(zip(chain.steps, chain_scores, strict=True)):
            bar = "#" * round(s * 20)
            mark = "   <- the wrong step" if k == chain.first_error else ""
            print(f"      {s:5.3f} {bar:<20} {step}{mark}", file=out)


def run_demo(args: argparse.Namespace) -> int:
    out = sys.stdout
    print("stepscore demo: the embedded arithmetic PRM, end to end\n", file=out)
    with tempfile.TemporaryDirectory(prefix="stepscore-demo-") as tmp:
        bundle = Path(tmp) / "bundle"
        checkpoint = default_checkpoint()
        print(f"[1/4] export  {checkpoint} -> {bundle}", file=out)
        try:
            from stepscore.export.pipeline import export_model
        except ImportError as exc:
            raise StepscoreError(f"the demo exports the model: pip install 'stepscore[export]' ({exc.name} missing)") from exc
        export_model(str(checkpoint), bundle, precision="fp32", progress=lambda line: print(f"      {line}", file=out))

        print("\n[2/4] serve   stepscore serve (a separate process)", file=out)
        proc, target = _start_server(bundle)
        try:
            print(f"      ready on {target}", file=out)
            data = held_out(args.seed, args.problems, args.chains)
            n_steps = sum(len(c.steps) for _, chains in data for c in chains)
            print(
                f"\n[3/4] search  best-of-{args.chains} on {args.problems} held-out problems over gRPC (one ScoreStream)",
                file=out,
            )
            scores, seconds = asyncio.run(_search(target, data))
            print(
                f"      {args.problems} requests, {args.problems * args.chains} chains, {n_steps} steps scored "
                f"in {seconds:.2f} s",
                file=out,
            )
            shown = [i for i, (_, chains) in enumerate(data) if any(c.first_error >= 0 for c in chains)][:2]
            for i in shown:
                problem, chains = data[i]
                _show(problem, chains[:4], scores[f"p{i}"][:4], out)
            rng = random.Random(args.seed)
            picks: Counter[str] = Counter()
            for i, (problem, chains) in enumerate(data):
                mins = [min(s) for s in scores[f"p{i}"]]
                picks["prm"] += chains[mins.index(max(mins))].final == problem.answer
                picks["majority"] += majority_vote(chains, rng).final == problem.answer
                picks["random"] += rng.choice(chains).final == problem.answer
                picks["oracle"] += any(c.final == problem.answer for c in chains)
            n = len(data)
            print(f"\n      selection of 1 of {args.chains} chains      accuracy", file=out)
            for key, label in (
                ("prm", "PRM, min step score"),
                ("majority", "majority vote"),
                ("random", "random"),
                ("oracle", "oracle (any right)"),
            ):
                print(f"      {label:<32} {picks[key] / n:6.3f}", file=out)
            print(
                f"      PRM beats majority vote by {100 * (picks['prm'] - picks['majority']) / n:+.1f} points and "
                f"random choice by {100 * (picks['prm'] - picks['random']) / n:+.1f}",
                file=out,
            )
        finally:
            print("\n[4/4] stop    SIGTERM: drain and exit", file=out)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            print(f"      server exited with code {code}", file=out)
    return 0 if code == 0 else 1
