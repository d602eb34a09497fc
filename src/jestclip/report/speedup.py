"""Speed-up to target: how many examples (or FLOPs) each run needed to reach a baseline's final accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from jestclip.report.runs import AVERAGE, RunLog

__all__ = ["SpeedupRow", "first_crossing", "speedup_table"]

COSTS = ("examples_learned", "flops_total")


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The smallest x at which the piecewise-linear curve through ``(xs, ys)`` reaches ``target``.

    Evaluations lie at increasing ``xs``; between two of them the curve is a straight line. ``None`` when no
    evaluation reaches the target.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values for {len(ys)} y values")
    if any(b < a for a, b in pairwise(xs)):
        raise ValueError("x values must not decrease")
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (target - y0) / (y - y0) * (x - x0))
    return None


@dataclass(frozen=True)
class SpeedupRow:
    """One run against the target: the cost to reach it (None: not reached) and baseline cost / that cost."""

    run: str
    method: str
    final: float
    examples: float | None
    flops: float | None
    examples_speedup: float | None
    flops_speedup: float | None


def speedup_table(
    runs: Sequence[RunLog], baseline: RunLog, metric: str = AVERAGE
) -> tuple[float, list[SpeedupRow]]:
    """``(target, rows)``: target = the baseline's final ``metric``; per run, the examples learned and total
    FLOPs at which it first reached the target (interpolated between evaluations) and the speed-ups
    ``baseline cost / run cost``. The baseline's cost is its whole run (the paper's "IID reaches this after N
    iterations"), even where a noisy curve touched the target earlier. A speed-up is None when the run never
    reached the target or reached it before training (cost 0).
    """
    final = baseline.final_eval
    target = float(final[metric])
    base = {c: float(final[c]) for c in COSTS}
    rows = []
    for run in runs:
        if run is baseline:
            cost: dict[str, float | None] = dict(base)
        else:
            cost = {c: first_crossing(*run.curve(c, metric), target) for c in COSTS}
        speed = {c: (base[c] / cost[c] if cost[c] else None) for c in COSTS}
        rows.append(
            SpeedupRow(
                run=run.name,
                method=run.method,
                final=float(run.final_eval[metric]),
                examples=cost["examples_learned"],
                flops=cost["flops_total"],
                examples_speedup=speed["examples_learned"],
                flops_speedup=speed["flops_total"],
            )
        )
    return target, rows
