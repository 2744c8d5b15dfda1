"""Step scores -> one solution score, by the rules the search code that uses each PRM applies (the docstring
of `aggregate` names the source of each rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from stepscore.runtime.types import AGGREGATES


def aggregate(scores: npt.NDArray[np.floating], names: Sequence[str], soft_min_temperature: float = 0.1) -> dict[str, float]:
    """min (Math-Shepherd), product (Let's Verify), mean (RLHFlow), last (search-and-learn) and
    soft_min = sum(softmax(-r / T) * r) (PURE). `scores` is non-empty."""
    r = np.asarray(scores, dtype=np.float64)
    out: dict[str, float] = {}
    for name in names:
        if name == "min":
            out[name] = float(r.min())
        elif name == "product":
            out[name] = float(np.prod(r))
        elif name == "mean":
            out[name] = float(r.mean())
        elif name == "last":
            out[name] = float(r[-1])
        elif name == "soft_min":
            z = -r / soft_min_temperature
            w = np.exp(z - z.max())
            out[name] = float((w / w.sum()) @ r)
        else:  # validated at the edge; reaching here is a bug
            raise ValueError(f"unknown aggregate {name!r}; known: {AGGREGATES}")
    return out
