"""Speed-up to target: how many examples (or FLOPs) each run needed to reach a baseline's final accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from jestclip.report.groups import RunGroup, as_group
from jestclip.report.runs import AVERAGE, RunLog

__all__ = ["SpeedupRow", "first_crossing", "lasting_crossing", "speedup_table"]

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


def lasting_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The smallest x from which the piecewise-linear curve through ``(xs, ys)`` stays at or above
    ``target`` up to its last evaluation: a noisy early touch followed by a fall doesn't count. ``None`` when
    the last evaluation is below the target.
    """
    first_crossing(xs, ys, target)  # the same checks
    below = [i for i, y in enumerate(ys) if y < target]
    if not below:
        return float(xs[0]) if xs else None
    i = below[-1]
    if i == len(ys) - 1:
        return None
    return first_crossing(xs[i:], ys[i:], target)


@dataclass(frozen=True)
class SpeedupRow:
    """One run (or seed group) against the target: the cost to reach it on its (seed-mean) curve, None when
    not reached, and baseline cost / that cost; ``*_per_seed``: the same speed-up from each seed's own curve;
    ``*_lasting``: the cost from which the (seed-mean) curve stays at or above the target, and its speed-up.
    """

    run: str
    method: str
    final: float
    examples: float | None
    flops: float | None
    examples_speedup: float | None
    flops_speedup: float | None
    seeds: int = 1
    final_std: float = 0.0
    examples_per_seed: tuple[float | None, ...] = ()
    flops_per_seed: tuple[float | None, ...] = ()
    examples_lasting: float | None = None
    flops_lasting: float | None = None
    examples_lasting_speedup: float | None = None
    flops_lasting_speedup: float | None = None


def _ratio(base: float, cost: float | None) -> float | None:
    return base / cost if cost else None


def speedup_table(
    runs: Sequence[RunLog | RunGroup], baseline: RunLog | RunGroup, metric: str = AVERAGE
) -> tuple[float, list[SpeedupRow]]:
    """``(target, rows)``: target = the baseline's final ``metric`` (mean over its seeds); per run or seed
    group, the examples learned and total FLOPs at which its seed-mean curve first reached the target
    (interpolated between evaluations) and the speed-ups ``baseline cost / run cost``, plus the speed-up of
    each seed's own curve, and the same from where the seed-mean curve stays at or above the target. The
    baseline's cost is its whole run (the paper's "IID reaches this after N iterations"), even where a noisy
    curve touched the target earlier. A speed-up is None when the run never
    reached the target or reached it before training (cost 0).
    """
    base_group = as_group(baseline)
    target, _ = base_group.final(metric)
    base = {c: base_group.final_eval[c] for c in COSTS}
    rows = []
    for run in runs:
        group = as_group(run)
        if group.runs == base_group.runs:
            cost: dict[str, float | None] = dict(base)
            lasting: dict[str, float | None] = dict(base)
            per_seed = {c: tuple(1.0 for _ in group.runs) for c in COSTS}
        else:
            cost = {c: first_crossing(*group.curve(c, metric)[:2], target) for c in COSTS}
            lasting = {c: lasting_crossing(*group.curve(c, metric)[:2], target) for c in COSTS}
            per_seed = {
                c: tuple(_ratio(base[c], first_crossing(*r.curve(c, metric), target)) for r in group.runs)
                for c in COSTS
            }
        final, final_std = group.final(metric)
        rows.append(
            SpeedupRow(
                run=group.name,
                method=group.label,
                final=final,
                examples=cost["examples_learned"],
                flops=cost["flops_total"],
                examples_speedup=_ratio(base["examples_learned"], cost["examples_learned"]),
                flops_speedup=_ratio(base["flops_total"], cost["flops_total"]),
                seeds=len(group.runs),
                final_std=final_std,
                examples_per_seed=per_seed["examples_learned"],
                flops_per_seed=per_seed["flops_total"],
                examples_lasting=lasting["examples_learned"],
                flops_lasting=lasting["flops_total"],
                examples_lasting_speedup=_ratio(base["examples_learned"], lasting["examples_learned"]),
                flops_lasting_speedup=_ratio(base["flops_total"], lasting["flops_total"]),
            )
        )
    return target, rows
