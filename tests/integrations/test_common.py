"""What the adapters share, without a server: step splitting, search ids, lazy imports, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from stepscore.integrations.common import Scorer, search_id_for, split_steps


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("2+3=5\n\n5*4=20", ["2+3=5", "5*4=20"]),
        ("2+3=5\n\n5*4=20\n\n", ["2+3=5", "5*4=20"]),  # a separator that ends the text ends the last step
        ("2+3=5\n\n", ["2+3=5"]),  # search-and-learn's beam after one iteration (stop string kept)
        ("", [""]),  # an empty completion is one empty step: the references score it once
        ("\n\n", [""]),
        ("2+3=5\n\n\n\n5*4=20", ["2+3=5", "", "5*4=20"]),  # an empty step between two others is kept
        ("2+3=5\n5*4=20", ["2+3=5\n5*4=20"]),  # one newline is inside a step
    ],
)
def test_split_steps(text: str, steps: list[str]) -> None:
    assert split_steps(text) == steps


def test_split_steps_with_another_separator_and_an_empty_one() -> None:
    assert split_steps("a\nb\n", "\n") == ["a", "b"]
    with pytest.raises(ValueError, match="separator"):
        split_steps("a", "")


def test_search_ids_are_stable_per_question_and_prefixed() -> None:
    assert search_id_for("(2+3)*4") == search_id_for("(2+3)*4")
    assert search_id_for("(2+3)*4") != search_id_for("(2+3)*5")
    assert search_id_for("(2+3)*4", "run-7-").startswith("run-7-")
    assert len(search_id_for("x" * 100_000)) == 24  # a digest: long questions make short header values
    assert Scorer(search_prefix=None).search_id("(2+3)*4") == ""  # anonymous calls


def test_a_scorer_pickles_before_and_after_use_without_its_client() -> None:
    scorer = Scorer("127.0.0.1:1", search_prefix="p-", chunk=3)
    _ = scorer.client  # a channel exists (gRPC channels connect lazily)
    copy = pickle.loads(pickle.dumps(scorer))
    assert copy.target == "127.0.0.1:1" and copy.chunk == 3 and copy.search_id("q") == scorer.search_id("q")
    assert copy._client is None  # made again at the copy's first call
    scorer.close()


def test_importing_the_adapters_loads_neither_grpc_nor_torch() -> None:
    code = (
        "import sys\n"
        "import stepscore.integrations.search_and_learn, stepscore.integrations.openr, stepscore.integrations.trl\n"
        "print(sorted(m for m in ('grpc', 'numpy', 'torch', 'trl', 'sal', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
