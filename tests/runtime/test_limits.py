"""Request-size limits are read from lengths alone, name the field and the limit; the work guard stops work
for a cancelled or expired request (time from a fake clock)."""

from __future__ import annotations

import pytest

from stepscore.errors import Cancelled, ConfigError, DeadlineExceeded, InvalidRequest
from stepscore.runtime.limits import RequestLimits, WorkGuard
from stepscore.runtime.types import TokenIds

LIMITS = RequestLimits(max_candidates=3, max_steps=4, max_problem_chars=10, max_step_chars=5, max_request_chars=60)


@pytest.mark.parametrize(
    ("problem", "prefix", "candidates", "field", "limit"),
    [
        ("p", [], [["a"]] * 4, "candidates", "3"),
        ("p" * 11, [], [["a"]], "problem", "10"),
        ("p", [], [["a"] * 5], r"candidates\[0\]\.steps", "4"),
        ("p", ["a", "b"], [["a"] * 3], r"candidates\[0\]\.steps", "4"),  # prefix steps count
        ("p", [], [["a"], ["a", "bbbbbb"]], r"candidates\[1\]\.steps\[1\]", "5"),
        ("p", ["bbbbbb"], [["a"]], r"prefix_steps\[0\]", "5"),
        ("p" * 10, ["bbbbb"] * 2, [["a"]] * 3, "request", "60"),  # problem and prefix counted per candidate
        ("p", [], [TokenIds(list(range(70)), [69])], "request", "60"),  # a token id counts one
    ],
)
def test_each_limit_names_its_field_and_value(
    problem: str, prefix: list[str], candidates: list[object], field: str, limit: str
) -> None:
    with pytest.raises(InvalidRequest, match=rf"^{field}: .*{limit}") as err:
        LIMITS.check(problem, prefix, candidates)  # type: ignore[arg-type]
    assert err.value.field.replace("\\", "") == field.replace("\\", "")


def test_the_size_is_what_the_formatter_builds() -> None:
    # problem (3) + prefix (2) per candidate, plus each candidate's steps
    assert LIMITS.check("abc", ["xy"], [["1", "22"], ["333"], TokenIds([1, 2], [1])]) == (5 + 3) + (5 + 3) + 2


class Huge(list[str]):
    """A candidate whose steps must never be read: the count check comes first."""

    def __iter__(self) -> object:  # type: ignore[override]
        raise AssertionError("read a step of a request already over the candidate limit")


def test_the_candidate_count_is_checked_before_any_candidate_is_read() -> None:
    with pytest.raises(InvalidRequest, match="candidates"):
        LIMITS.check("p", [], [Huge(["a"])] * 4)


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_candidates must be a positive integer"):
        RequestLimits(max_candidates=0).checked()
    with pytest.raises(ConfigError, match="could never pass"):
        RequestLimits(max_problem_chars=100, max_request_chars=10).checked()


def test_the_guard_stops_cancelled_or_expired_work() -> None:
    now = [100.0]
    guard = WorkGuard(deadline=101.0, clock=lambda: now[0])
    guard.check()  # in time
    now[0] = 101.0
    with pytest.raises(DeadlineExceeded):
        guard.check()
    open_ended = WorkGuard(deadline=None, clock=lambda: now[0])
    open_ended.check()
    open_ended.cancel()
    with pytest.raises(Cancelled):
        open_ended.check()
