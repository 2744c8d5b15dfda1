"""search-and-learn's beam search with its own RLHFlow PRM scoring vs the stepscore adapter (CPU).

The PRM: a random-weight RLHFlow-family model (LlamaForCausalLM, hidden 384, 8 layers, 6 heads, 2 kv heads)
with the real Llama-3.1 tokenizer from ../shared/tokenizers/llama3.1, exported with `--preset rlhflow` to fp32
into benchmarks/.cache/. The traffic: the beam workload (search-and-learn's beam search, 16 candidates per
problem and iteration, each the whole prefix + its new step, rebuilt from ../shared/data/search_traces_sal),
one search after the other, its iterations in order, one `prm.score(prompts, completions)` per iteration as
search-and-learn calls it (one entry per beam, `[beam.current_text]` each). Systems:

- (a) search-and-learn's `RLHFFlow._score_batched`, re-stated here: a chat per completion (the first user turn
  question + " " + step, then a user turn per step, each answered by an assistant "+"), the chat template,
  `batch_size` chats per right-padded forward pass of the HF model in torch eager (full logits, as it does),
  the softmax over the logits of "+" and "-" at the token before each "+". Its beam search passes no
  batch size, so it runs with the method's default, 1; `--batch-sizes` adds others. A "two-row head"
  variant computes only the logits of "+" and "-": in this small model the 128k-token lm_head is most of
  the eager cost (49M of 62M multiply-adds a token), which it is not in an 8B one.
- (b) `stepscore.integrations.search_and_learn.StepscorePRM` against a `stepscore serve` on loopback
  (default flags: the prefix cache on), `prm.end([problem])` after each search.

Each system is warmed up by one search (not measured); tokens are every candidate's formatted conversation
(for (b) the server's count, `prm.usage`, cached tokens included; it stops at the last read, so each
candidate is 2 tokens shorter than (a)'s chat: its last "+" and <|eot_id|>). Step scores of every system are compared
with (b)'s. Writes the `integrations` section of benchmarks/RESULTS.md with --write.

    python -m benchmarks.integrations_sal [--problems 4] [--batch-sizes 1 4] [--write]

On 2 cores (a) at batch 1 takes about 4 minutes a search (the traces' searches are ~33 calls of 16
candidates of ~800 tokens), its two-row-head variant about a fifth of that, (b) seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.cpu_suite import CACHE, SHAPE, SHARED, cmd_line, environment, log, write_section
from stepscore.runtime.bench.workloads import load_workload

STEP_SEPARATOR = "\n\n"  # search-and-learn's: its steps are generated with stop=["\n\n"]
BEAM_MAX_ITERATIONS = 40  # the beam workload's (and search-and-learn's default num_iterations)
# Llama 3.1's vocabulary, begin-of-text and end-of-turn ids (the real tokenizer's)
LLAMA = {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128009}

HEAD_NOTE = """ The two-row-head row computes only the logits of "+" and
"-": in this small model the 128k-token lm_head is about 80% of the eager multiply-adds (in an 8B model, 7%)."""

Search = tuple[str, list[list[list[str]]]]  # a problem and its calls, each call's candidates as steps
Scores = list[list[list[float]]]  # search-and-learn's shape: per entry, per completion, per step


def build_model() -> tuple[Path, Path]:
    """The RLHFlow-shaped PRM: HF folder (random weights, real Llama-3.1 tokenizer) and its fp32 bundle, cached."""
    folder, bundle = CACHE / "sal-rlhflow-prm", CACHE / "sal-rlhflow-prm-fp32"
    from benchmarks.models import bundle_is_current

    if bundle_is_current(bundle):
        return folder, bundle
    tok = SHARED / "tokenizers" / "llama3.1"
    if not (folder / "model.safetensors").is_file() and not tok.is_dir():
        raise SystemExit(f"{tok} is missing: this benchmark needs the real Llama-3.1 tokenizer and traces in ../shared")
    from benchmarks.models import write_random_prm
    from stepscore.export.pipeline import export_model
    from stepscore.export.presets import ExportOptions

    write_random_prm(folder, {**SHAPE, **LLAMA}, dtype="float32", tokenizer=tok, system_prompt=None, architecture="llama-lm")
    export_model(
        str(folder),
        bundle,
        ExportOptions(preset="rlhflow"),
        precision="fp32",
        force=True,
        progress=lambda line: log("  " + line),
    )
    return folder, bundle


def load_searches(problems: int, iterations: int | None = None) -> list[Search]:
    """The first `problems` beam searches of the traces, each as its calls in iteration order (the first
    `iterations` of them: a quick check, not search-and-learn's traffic)."""
    wl = load_workload("beam", SHARED / "data", limit=problems * BEAM_MAX_ITERATIONS)
    by_problem: dict[str, list[list[list[str]]]] = {}
    for r in wl.requests:
        by_problem.setdefault(r.problem, []).append([list(c) for c in r.candidates])  # type: ignore[arg-type]
    searches = list(by_problem.items())
    if len(searches) < problems:
        raise SystemExit(f"the beam traces hold {len(searches)} problems, fewer than {problems}")
    return [(problem, calls[:iterations]) for problem, calls in searches[:problems]]


class PRM(Protocol):
    def score(self, questions: list[str], outputs: list[list[str]]) -> Scores: ...


class EagerRLHFlow:
    """search-and-learn's `RLHFFlow._score_batched` (src/sal/models/reward_models.py), re-stated.

    It marks the reads with a second, parallel chat whose assistant turns hold "ки" (one token in Llama 3)
    in place of "+", and reads the score at the token before each mark. Chats are rendered with the chat
    template and tokenized without added special tokens, which is what `apply_chat_template` does inside
    (called this way the code does not depend on its return type, which transformers 5 changed). No
    attention mask, as there: right padding does not reach earlier positions of a causal model."""

    def __init__(self, folder: Path, batch_size: int, full_head: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.batch_size = batch_size
        self.full_head = full_head
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.tokenizer.padding_side = "right"
        self.tokenizer.pad_token = self.tokenizer.eos_token
        model_cls: Any = AutoModelForCausalLM  # from_pretrained's decorator is mistyped in transformers
        self.model = model_cls.from_pretrained(str(folder), dtype=torch.float32)
        self.model.eval()
        self.model.config.use_cache = False
        self.model.config.pad_token_id = self.model.config.eos_token_id
        self.candidates = [self.tokenizer.encode("+")[-1], self.tokenizer.encode("-")[-1]]
        self.mark = int(self.tokenizer("ки").input_ids[1])
        self.tokens = 0  # unpadded tokens of every chat scored

    def _chats(self, question: str, answer: str, assistant: str) -> str:
        chat: list[dict[str, str]] = []
        for k, step in enumerate(answer.split(STEP_SEPARATOR)):
            chat.append({"role": "user", "content": f"{question} {step}" if k == 0 else step})
            chat.append({"role": "assistant", "content": assistant})
        return str(self.tokenizer.apply_chat_template(chat, tokenize=False))

    def _batch(self, texts: Sequence[str]) -> Any:
        return self.tokenizer(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")

    def score(self, questions: list[str], outputs: list[list[str]]) -> Scores:
        import torch

        plus, marked = [], []
        for question, answers in zip(questions, outputs, strict=True):
            for answer in answers:
                plus.append(self._chats(question, answer, "+"))
                marked.append(self._chats(question, answer, "ки"))
        flat: list[list[float]] = []
        for i in range(0, len(plus), self.batch_size):
            batch = self._batch(plus[i : i + self.batch_size])
            ids, ids2 = batch.input_ids, self._batch(marked[i : i + self.batch_size]).input_ids
            assert ids.shape == ids2.shape
            self.tokens += int(batch.attention_mask.sum())  # the pad is <|eot_id|>, which chats hold too
            with torch.no_grad():
                if self.full_head:
                    logits = self.model(ids).logits[:, :, self.candidates]
                else:
                    hidden = self.model.model(ids).last_hidden_state
                    logits = hidden @ self.model.lm_head.weight[self.candidates].T
                scores = logits.softmax(dim=-1)[:, :, 0]
            for row in range(ids.shape[0]):
                # the score of a "+" is predicted at the token before it
                flat.append(scores[row, :-1][ids2[row, 1:] == self.mark].tolist())
        out: Scores = []
        counter = 0
        for answers in outputs:
            out.append(flat[counter : counter + len(answers)])
            counter += len(answers)
        return out


@dataclass
class Run:
    system: str
    calls: int
    tokens: int
    wall_s: float
    scores: list[Scores]  # per call

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


def beam_call(problem: str, candidates: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """An iteration's `prm.score` arguments as search-and-learn's beam search builds them: one entry per beam."""
    return [problem] * len(candidates), [[STEP_SEPARATOR.join(steps)] for steps in candidates]


def drive(prm: PRM, searches: Sequence[Search], end: Any = None) -> tuple[int, list[Scores]]:
    """Every search in turn, its iterations in order, one call each: search-and-learn's loop, less generation."""
    calls, scores = 0, []
    for n, (problem, iterations) in enumerate(searches, 1):
        for candidates in iterations:
            scores.append(prm.score(*beam_call(problem, candidates)))
            calls += 1
        if end is not None:
            end([problem])
        if len(searches) > 1:  # eager runs take minutes a search on a small machine: show progress
            log(f"    search {n}/{len(searches)}: {len(iterations)} calls")
    return calls, scores


def run_eager(folder: Path, warm: Search, searches: Sequence[Search], batch_size: int, full_head: bool) -> Run:
    prm = EagerRLHFlow(folder, batch_size, full_head)
    drive(prm, [warm])
    prm.tokens = 0
    start = time.perf_counter()
    calls, scores = drive(prm, searches)
    wall = time.perf_counter() - start
    head = "full logits" if full_head else "two-row head"
    name = f"(a) search-and-learn RLHFlow, torch eager, batch_size={batch_size}, {head}"
    return Run(name, calls, prm.tokens, wall, scores)


def run_stepscore(bundle: Path, warm: Search, searches: Sequence[Search]) -> tuple[Run, int]:
    """(b) and the tokens its server answered from the prefix cache."""
    from stepscore.integrations.search_and_learn import StepscorePRM
    from stepscore.runtime.bench.systems import LocalServer

    server = LocalServer(bundle)
    try:
        with StepscorePRM(None, server.start()) as prm:
            drive(prm, [warm], prm.end)
            before = (prm.usage.tokens, prm.usage.cached_tokens)
            start = time.perf_counter()
            calls, scores = drive(prm, searches, prm.end)
            wall = time.perf_counter() - start
            tokens, cached = prm.usage.tokens - before[0], prm.usage.cached_tokens - before[1]
    finally:
        server.stop()
    return Run("(b) stepscore adapter (`StepscorePRM`), `stepscore serve` on loopback", calls, tokens, wall, scores), cached


def max_diff(a: Sequence[Scores], b: Sequence[Scores]) -> tuple[float, int]:
    """The largest |a - b| over every step score, and the completions whose step counts differ."""
    worst, mismatched = 0.0, 0
    for call_a, call_b in zip(a, b, strict=True):
        for entry_a, entry_b in zip(call_a, call_b, strict=True):
            for steps_a, steps_b in zip(entry_a, entry_b, strict=True):
                if len(steps_a) != len(steps_b):
                    mismatched += 1
                    continue
                worst = max([worst, *(abs(x - y) for x, y in zip(steps_a, steps_b, strict=True))])
    return worst, mismatched


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=4, help="beam searches measured (one more warms up)")
    parser.add_argument("--iterations", type=int, help="only the first ITERATIONS calls of each search (a quick check)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1], help="(a)'s batch sizes (1: as its beam search calls it)"
    )
    parser.add_argument("--no-two-row-head", action="store_true", help="leave out (a) with only the '+'/'-' logits")
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    folder, bundle = build_model()
    warm, *searches = load_searches(args.problems + 1, args.iterations)
    log(f"{len(searches)} searches, {sum(len(c) for _, c in searches)} calls (+ 1 search warming up each system)")

    ours, cached = run_stepscore(bundle, warm, searches)
    log(
        f"  {ours.system}: {ours.calls} calls, {ours.tokens:,} tokens, {ours.wall_s:.1f} s, "
        f"{ours.tokens_per_s:,.0f} tok/s, {cached:,} tokens from the prefix cache"
    )
    eager = [(b, True) for b in args.batch_sizes] + ([] if args.no_two_row_head else [(1, False)])
    runs: list[tuple[Run, float, int]] = []
    for batch_size, full in eager:
        r = run_eager(folder, warm, searches, batch_size, full)
        diff, mismatched = max_diff(r.scores, ours.scores)
        log(
            f"  {r.system}: {r.calls} calls, {r.tokens:,} tokens, {r.wall_s:.1f} s, {r.tokens_per_s:,.0f} tok/s, "
            f"max |score - (b)| {diff:.2e}, completions with other step counts {mismatched}"
        )
        runs.append((r, diff, mismatched))
    base = runs[0][0] if runs else ours

    def row(r: Run, diff: str) -> str:
        return (
            f"| {r.system} | {r.calls} | {r.tokens:,} | {r.wall_s:,.1f} | {r.tokens_per_s:,.0f} | "
            f"{base.wall_s / r.wall_s:.2f}x | {diff} |"
        )

    lines = [row(r, f"{d:.1e}" + (f" ({m} completions with other step counts)" if m else "")) for r, d, m in runs]
    lines.append(row(ours, "-"))
    table = "\n".join(lines)
    log(table)
    if not args.write:
        return
    manifest = json.loads((bundle / "manifest.json").read_text())
    body = f"""## search-and-learn integration: its RLHFlow eager scoring vs the stepscore adapter (CPU)

{environment()}. Command: `{cmd_line().replace("benchmarks.cpu_suite", "benchmarks.integrations_sal")}`.
Model: RLHFlow-family PRM (LlamaForCausalLM), random weights, 8 layers x hidden 384, real Llama-3.1 tokenizer,
fp32 (bundle: preset {manifest.get("preset", "rlhflow")}). Traffic: {len(searches)} beam searches of
`../shared/data/search_traces_sal/*beam_search_N16*` (the `beam` workload: 16 candidates per iteration, the
whole prefix + the new step), one after the other, one `prm.score` per iteration as search-and-learn's beam
search calls it; one more search warmed each system up. Tokens: every candidate's formatted chat
((b) stops at the last read, 2 tokens short of (a)'s chat, which ends in "+<|eot_id|>");
(b) answered {cached:,} of its {ours.tokens:,} from its prefix cache. Ratio: (a)'s first row's wall time over
the row's; score diff: the largest difference from (b)'s step scores.

| system | calls | tokens | wall s | tokens/s | speed vs first row | max score diff vs (b) |
|---|---|---|---|---|---|---|
{table}

(a) is `RLHFFlow._score_batched` of search-and-learn, re-stated (`benchmarks/integrations_sal.py`); its beam
search passes no batch size, so it runs at batch 1.{HEAD_NOTE if not args.no_two_row_head else ""}
"""
    write_section("integrations", body)


if __name__ == "__main__":
    main()
