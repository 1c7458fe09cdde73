"""The papers' derived columns, computed from raw scores (%, or MT-Bench's 1-10), and their rounding audit.

AAAI (DESIGN.md): Avg1 = mean of the knowledge scores (TriviaQA, NQ Open, WebQS); Avg1(Per) = mean over them
of min(100, 100 x score / pre-trained score); Avg2 = mean of the downstream scores; GM = sqrt(Avg1 x Avg2).
Extended papers: Avg = mean of every raw column (knowledge and downstream). A value is None when any input is.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

Scores = dict[str, Optional[float]]
DERIVED = ("avg1", "avg1_per", "avg2", "gm", "avg")
PRINTED_STEP = 0.01  # the papers print two decimals


def _mean(values: list[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def derive(scores: Scores, base: Scores, knowledge: list[str], downstream: list[str],
           columns: list[str]) -> Scores:
    """``{column: value}`` for the derived ``columns`` of one row (``scores``) given the pre-trained row
    (``base``, for Avg1(Per))."""
    out: Scores = {}
    know = [scores.get(k) for k in knowledge]
    down = [scores.get(k) for k in downstream]
    avg1, avg2 = _mean(know), _mean(down)
    for column in columns:
        if column == "avg1":
            out[column] = avg1
        elif column == "avg1_per":
            ratios = []
            for k in knowledge:
                s, b = scores.get(k), base.get(k)
                ratios.append(None if s is None or not b else min(100.0, 100.0 * s / b))
            out[column] = _mean(ratios)
        elif column == "avg2":
            out[column] = avg2
        elif column == "gm":
            out[column] = math.sqrt(avg1 * avg2) if avg1 is not None and avg2 is not None and avg1 * avg2 >= 0 \
                else None
        elif column == "avg":
            out[column] = _mean(know + down)
        else:
            raise ValueError(f"unknown derived column '{column}'; known: {', '.join(DERIVED)}")
    return out


def rounding_interval(fn: Callable[[Scores, Scores], Optional[float]], scores: Scores, base: Scores
                      ) -> Optional[tuple[float, float]]:
    """(lowest, highest) of ``fn`` over every raw value within half a printed step of what was printed (the
    derived columns are monotone in each input, so the corners of that box bound it)."""
    keys = [("s", k) for k, v in scores.items() if v is not None] + [("b", k) for k, v in base.items() if v is not None]
    half = PRINTED_STEP / 2
    lo, hi = math.inf, -math.inf
    for signs in itertools.product((-half, half), repeat=len(keys)):
        s, b = dict(scores), dict(base)
        for (which, key), delta in zip(keys, signs):
            (s if which == "s" else b)[key] += delta
        value = fn(s, b)
        if value is None:
            return None
        lo, hi = min(lo, value), max(hi, value)
    return lo, hi
