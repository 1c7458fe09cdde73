"""The statistics of the learning-forgetting frontier (``lnull.tables.frontier``), pure functions on numbers.

A method's *curve* is its fine-tunes in learning-rate order, each a point (task learned, knowledge lost):
x = held-out task score (%), y = the average over knowledge sets of the paired change of gold-answer NLL from the
pre-trained model (nats/token; higher = more lost). Every curve starts at the pre-trained model (its task score,
0): a learning rate of zero changes nothing, so a method reaches every task level between the pre-trained score
and its best one.

*Knowledge lost at matched learning* is a curve's y where its x equals a common level T, by linear interpolation
between consecutive points (where the curve crosses T more than once, the least loss: the best the method does at
that learning). The default T is the best task score every method reaches (the minimum over methods of each
method's maximum). Uncertainty: a bootstrap that resamples the same questions, held-out problems and seeds for
every method (so differences between methods are paired), re-reading each curve at the fixed T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class PointItems:
    """One fine-tune point (a method at one learning rate) as per-item values, seeds stacked.

    ``task``: [seeds, n_task] held-out scores per problem (%: 0 or 100 for exact match);
    ``knowledge``: one [seeds, n_b] array per knowledge set of per-question NLL change from the pre-trained model
    (nats/token), the same questions in the same order for every point."""

    lr: float
    task: np.ndarray
    knowledge: list[np.ndarray]

    def x(self) -> float:
        return float(self.task.mean())

    def y(self) -> float:
        return float(np.mean([k.mean() for k in self.knowledge]))


def loss_at(curve: Sequence[tuple[float, float]], level: float) -> Optional[float]:
    """y of the piecewise-linear ``curve`` [(x, y), ...] (in learning-rate order, the pre-trained point first) at
    x = ``level``: the least y over every segment whose x-range holds ``level``; None if none does."""
    best: Optional[float] = None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if not min(x0, x1) <= level <= max(x0, x1):
            continue
        y = min(y0, y1) if x1 == x0 else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
        best = y if best is None else min(best, y)
    if best is None and len(curve) == 1 and curve[0][0] == level:
        best = curve[0][1]
    return best


def matched_level(curves: dict[str, Sequence[tuple[float, float]]]) -> Optional[float]:
    """The best task score every method reaches: min over methods of max x of its curve (None without curves)."""
    tops = [max(x for x, _ in c) for c in curves.values() if c]
    return min(tops) if tops else None


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Per point (x = task, higher better; y = knowledge lost, lower better): True when no other point is at
    least as good on both and strictly better on one."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(j != i and x2 >= x and y2 <= y and (x2 > x or y2 < y) for j, (x2, y2) in enumerate(points))
        flags.append(not dominated)
    return flags


@dataclass
class Interval:
    """A bootstrap estimate: the observed value, 95 % percentile interval, share of resamples below 0, and how
    many resamples gave a value (a curve can miss the level in a resample)."""

    value: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    below_zero: Optional[float]
    resamples: int


def _interval(observed: Optional[float], draws: list[float]) -> Interval:
    if observed is None or not draws:
        return Interval(observed, None, None, None, len(draws))
    arr = np.asarray(draws)
    lo, hi = np.percentile(arr, [2.5, 97.5])
    return Interval(observed, float(lo), float(hi), float((arr < 0).mean()), len(draws))


def _resampled_curve(start: tuple[float, float], points: list[PointItems], seeds: np.ndarray, task_idx: np.ndarray,
                     know_idx: list[np.ndarray]) -> list[tuple[float, float]]:
    curve = [start]
    for p in points:
        task = p.task[seeds % p.task.shape[0]].mean(axis=0)[task_idx].mean()
        know = np.mean([k[seeds % k.shape[0]].mean(axis=0)[idx].mean() for k, idx in zip(p.knowledge, know_idx)])
        curve.append((float(task), float(know)))
    return curve


def bootstrap_matched(base_task: np.ndarray, methods: dict[str, list[PointItems]], level: float,
                      pairs: Sequence[tuple[str, str]], iters: int = 2000, seed: int = 0
                      ) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """Knowledge lost at matched learning (``level``, fixed) per method, and ``pairs`` (a, b) of differences
    a - b (< 0: a keeps more), each with a bootstrap over held-out problems, questions and seeds, resampled
    jointly for every method (paired).

    ``base_task``: [n_task] the pre-trained model's per-problem scores (%), the curves' first point (x, 0);
    ``methods``: name -> its points in learning-rate order (each with every item of every set)."""
    rng = np.random.default_rng(seed)
    every = [p for pts in methods.values() for p in pts]
    if not every:
        return {}, {}
    n_task = len(base_task)
    n_know = [k.shape[1] for k in every[0].knowledge]
    n_seeds = max(p.task.shape[0] for p in every)
    observed = {m: loss_at([(float(base_task.mean()), 0.0)] + [(p.x(), p.y()) for p in pts], level)
                for m, pts in methods.items()}
    draws: dict[str, list[Optional[float]]] = {m: [] for m in methods}
    for _ in range(iters):
        task_idx = rng.integers(0, n_task, n_task)
        know_idx = [rng.integers(0, n, n) for n in n_know]
        seeds = rng.integers(0, n_seeds, n_seeds)
        start = (float(base_task[task_idx].mean()), 0.0)
        for m, pts in methods.items():
            draws[m].append(loss_at(_resampled_curve(start, pts, seeds, task_idx, know_idx), level))
    per_method = {m: _interval(observed[m], [d for d in draws[m] if d is not None]) for m in methods}
    per_pair = {}
    for a, b in pairs:
        if a not in methods or b not in methods or a == b:
            continue
        diff = None if observed[a] is None or observed[b] is None else observed[a] - observed[b]
        paired = [x - y for x, y in zip(draws[a], draws[b]) if x is not None and y is not None]
        per_pair[(a, b)] = _interval(diff, paired)
    return per_method, per_pair


def log_grid(center: float, points: int, step: float) -> list[float]:
    """``points`` learning rates spaced by the factor ``step`` around ``center`` (the middle one, or the lower
    middle for an even count), rounded to 3 significant digits, ascending."""
    first = -((points - 1) // 2)
    return [float(f"{center * step ** k:.3g}") for k in range(first, first + points)]


def widened(grid: list[float], best: Optional[float], step: float) -> Optional[float]:
    """The next learning rate beyond the grid's edge when ``best`` (the best rate by the task score) is on that
    edge (lowest -> one step lower, highest -> one step higher); None when it is inside or unknown."""
    if best is None or len(grid) < 2:
        return None
    ordered = sorted(grid)
    if best == ordered[0]:
        return float(f"{ordered[0] / step:.3g}")
    if best == ordered[-1]:
        return float(f"{ordered[-1] * step:.3g}")
    return None
