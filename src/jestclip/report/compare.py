"""Comparing seed groups: a metric read at a FLOP budget, and a decision rule over seeds.

The rule is the one Study III registered before its runs (docs/studies/study3.md): X is *above* Y iff X's
seed mean exceeds Y's by more than ``k`` (2) times the larger of the two seed standard deviations (sample sd,
n − 1), *below* under the same rule the other way round, and *level* otherwise. With one seed on either side
there is no sd and no verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jestclip.report.runs import RunLog

__all__ = ["Verdict", "at_flops", "verdict"]


def at_flops(run: RunLog, budget: float, metric: str) -> tuple[float, float] | None:
    """``(metric, step)`` of ``run`` interpolated linearly between its evaluations at ``budget`` total
    per-step FLOPs (``flops_total``): a longer run read part-way down its schedule; None when its evaluations
    do not reach that far (or start after it)."""
    rows = [e for e in run.evals if e.get("flops_total") is not None and e.get(metric) is not None]
    xs = [float(e["flops_total"]) for e in rows]
    if not xs or not xs[0] <= budget <= xs[-1]:
        return None
    value = np.interp(budget, xs, [float(e[metric]) for e in rows])
    return float(value), float(np.interp(budget, xs, [float(e["step"]) for e in rows]))


@dataclass(frozen=True)
class Verdict:
    """The decision rule applied to two samples of seeds: ``word`` is ``above``, ``below``, ``level`` or
    ``no verdict``; ``difference`` = mean(x) − mean(y); ``margin`` = k · max(sd(x), sd(y))."""

    word: str
    difference: float
    margin: float | None

    def __str__(self) -> str:
        margin = "—" if self.margin is None else f"{self.margin:.2f}"
        return f"{self.word} ({self.difference:+.2f}, margin {margin})"


def verdict(x: Sequence[float], y: Sequence[float], k: float = 2.0) -> Verdict:
    """Whether the seeds ``x`` are above, level with or below the seeds ``y`` (module docstring)."""
    if not x or not y:
        raise ValueError("each side needs at least one seed")
    difference = statistics.fmean(x) - statistics.fmean(y)
    if len(x) < 2 or len(y) < 2:
        return Verdict("no verdict", difference, None)
    margin = k * max(statistics.stdev(x), statistics.stdev(y))
    word = "above" if difference > margin else "below" if -difference > margin else "level"
    return Verdict(word, difference, margin)
