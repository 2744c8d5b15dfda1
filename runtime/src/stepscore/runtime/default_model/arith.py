"""The default model's task: multi-step arithmetic, a noisy policy, and an automated step verifier.

This follows the classic PRM recipe end to end on a task small enough for a CPU: problems with known
solution chains ("(17+25)*3-8": "17+25=42", "42*3=126", "126-8=118"), a "policy" that plants errors at
a known step (a wrong result, a wrong operand, a number copied wrong, a wrong operation; the steps after
the first error carry it forward correctly), and a verifier that labels every step. A step is good when
it and every step before it are right: after the first error the solution cannot recover.

Pure Python, no torch: the demo's search client samples chains from the same policy.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

OPS = ("+", "-", "*")
STEP_RE = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")
MAX_VALUE = 50


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # applied left to right

    @property
    def expression(self) -> str:
        text, last = str(self.start), None
        for op, b in self.ops:
            # parenthesise only where precedence would otherwise change the order
            if op == "*" and last in ("+", "-"):
                text = f"({text})"
            text, last = f"{text}{op}{b}", op
        return text

    @property
    def text(self) -> str:
        return self.expression

    def values(self) -> list[int]:
        out, v = [], self.start
        for op, b in self.ops:
            v = apply(v, op, b)
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def solution(self) -> list[str]:
        steps, v = [], self.start
        for op, b in self.ops:
            w = apply(v, op, b)
            steps.append(f"{v}{op}{b}={w}")
            v = w
        return steps


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4) -> Problem:
    """Values stay within 0..MAX_VALUE, second operands are single digits and products are of two
    digits: small enough for a model trained for three minutes on a CPU to check every step, rich enough
    for every kind of slip."""
    v = rng.randint(2, 20)
    start, ops = v, []
    for _ in range(rng.randint(min_steps, max_steps)):
        choices = [
            op for op in OPS if not (op == "*" and v > 9) and not (op == "-" and v < 2) and not (op == "+" and v >= MAX_VALUE)
        ]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, min(9, MAX_VALUE - v))
        elif op == "-":
            b = rng.randint(1, min(9, v - 1))
        else:
            b = rng.randint(2, min(9, MAX_VALUE // v))
        v = apply(v, op, b)
        ops.append((op, b))
    return Problem(start, tuple(ops))


@dataclass(frozen=True)
class Chain:
    steps: list[str]
    labels: list[bool]  # per step: this step and every earlier one are right
    first_error: int  # index of the first wrong step, -1 if none

    @property
    def final(self) -> int | None:
        m = STEP_RE.match(self.steps[-1]) if self.steps else None
        return int(m.group(4)) if m else None


def verify(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """The automated verifier: label each step from the problem alone (not from how it was made)."""
    labels, ok, carried = [], True, problem.start
    for k, step in enumerate(steps):
        m = STEP_RE.match(step)
        if k >= len(problem.ops) or m is None:
            ok = False
        else:
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            want_op, want_b = problem.ops[k]
            ok = ok and a == carried and op == want_op and b == want_b and c == apply(a, op, b)
            carried = c
        labels.append(ok)
    return labels


MISTAKES = ("result", "operand", "copy", "operation")


def _mistake(rng: random.Random, a: int, op: str, b: int, weights: Sequence[float] | None = None) -> tuple[int, str, int, int]:
    """One wrong step (a, op, b, c) in one of four ways; never accidentally right."""
    kind = rng.choices(MISTAKES, weights=weights)[0]
    for _ in range(20):
        aa, oo, bb = a, op, b
        if kind == "result":
            c = apply(a, op, b) + rng.choice([-1, 1]) * rng.choice([1, 1, 2, 3, 5, 10, 20])
            return a, op, b, c
        if kind == "operand":
            bb = max(1, b + rng.choice([-2, -1, 1, 2, 3]))
        elif kind == "copy":
            digits = str(abs(a))
            swapped = int(digits[::-1]) * (1 if a >= 0 else -1)
            aa = swapped if swapped != a else a + rng.choice([-1, 1, 10])
        else:
            oo = rng.choice([o for o in OPS if o != op])
        c = apply(aa, oo, bb)
        if (aa, oo, bb) != (a, op, b) and c != apply(a, op, b):
            return aa, oo, bb, c
        kind = "result"
    return a, op, b, apply(a, op, b) + 1


def sample_chain(
    problem: Problem,
    rng: random.Random,
    p_error: float = 0.5,
    trap: int | None = None,
    mistake_weights: Sequence[float] | None = None,
) -> Chain:
    """The noisy policy. With probability p_error one step goes wrong (at `trap`'s step with its
    seeded mistake half of the time, so wrong answers repeat as an LLM's would); later steps carry the
    wrong value forward correctly."""
    n = len(problem.ops)
    error_at = -1
    mistake_rng = rng
    if rng.random() < p_error:
        if trap is not None and rng.random() < 0.5:
            error_at = trap % n
            mistake_rng = random.Random(trap)
        else:
            error_at = rng.randrange(n)
    steps, v = [], problem.start
    for k, (op, b) in enumerate(problem.ops):
        if k == error_at:
            a2, op2, b2, c = _mistake(mistake_rng, v, op, b, mistake_weights)
            steps.append(f"{a2}{op2}{b2}={c}")
        else:
            c = apply(v, op, b)
            steps.append(f"{v}{op}{b}={c}")
        v = c
    labels = verify(problem, steps)
    first = labels.index(False) if False in labels else -1
    return Chain(steps, labels, first)


def next_step(problem: Problem, k: int, value: int, rng: random.Random, p_error: float = 0.3) -> tuple[str, int]:
    """The policy's step k from the value the chain has reached: (step text, value it states). With
    probability `p_error` it is a slip; the value stated is carried forward either way. A search over the
    policy (the benchmark's beam search) extends a kept chain one step at a time with this."""
    op, b = problem.ops[k]
    if rng.random() < p_error:
        a2, op2, b2, c = _mistake(rng, value, op, b)
        return f"{a2}{op2}{b2}={c}", c
    c = apply(value, op, b)
    return f"{value}{op}{b}={c}", c


def sample_training_chain(
    problem: Problem, rng: random.Random, p_step_error: float, mistake_weights: Sequence[float] | None = None
) -> Chain:
    """Training chains: every step goes wrong independently, so one chain teaches several slips.

    Later steps carry the stated (possibly wrong) value forward, as the policy does."""
    steps, v = [], problem.start
    for op, b in problem.ops:
        if rng.random() < p_step_error:
            a2, op2, b2, c = _mistake(rng, v, op, b, mistake_weights)
            steps.append(f"{a2}{op2}{b2}={c}")
        else:
            c = apply(v, op, b)
            steps.append(f"{v}{op}{b}={c}")
        v = c
    labels = verify(problem, steps)
    return Chain(steps, labels, labels.index(False) if False in labels else -1)


def majority_vote(chains: Sequence[Chain], rng: random.Random) -> Chain:
    counts = Counter(c.final for c in chains)
    best = max(counts.values())
    winners = [a for a, n in counts.items() if n == best]
    pick = rng.choice(winners)
    return next(c for c in chains if c.final == pick)
