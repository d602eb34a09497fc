"""Selection schedules: on which steps a selecting method selects, and at what filter ratio.

A run of a selecting method (``jest``, ``independent``, ``flexi-jest``) selects on every step at the run's
filter ratio f by default. A ``SelectionSchedule`` in the method's settings says otherwise, in fractions of
the run's ``steps`` so that it scales with them:

- a window: selection only on steps ``[round(start·T), round(end·T))`` (``end=0.25``: the first quarter);
- ``every``: within the window, selection on every k-th step only;
- ``final_filter_ratio``: f annealed linearly over the window's selecting steps, from the run's filter ratio
  at the first to this value at the last.

Every other fact follows from one function, ``super_batch_at``: step t draws B_t candidates,
``round(b / (1 - f_t))`` (a multiple of the world size under torchrun), and **a step selects iff B_t > b**. A
step that does not select — outside the window, between every k-th, or where the annealed f leaves B_t = b —
is an IID step: it draws b examples, learns on all of them exactly and costs an IID step (appendix A.4). The
data sources serve each step's B_t (``data.SuperBatchStream(batch_sizes=...)``, ``data.pool``), the loop picks
the step function from it and charges its FLOPs (``startup.StepCosts``), and a run scheduled for a FLOP budget
takes ``steps_for_flops`` steps.

This is not in the paper, whose runs select on every step at one f; it is what users of JEST implementations
ask for (start and end of selection, interleaving with plain batches), and selection's cost falls on the steps
that select.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SelectionSchedule",
    "filter_ratio_at",
    "run_flops",
    "selecting_steps",
    "steps_for_flops",
    "super_batch_at",
    "super_batches",
]


@dataclass(frozen=True)
class SelectionSchedule:
    """On which steps a selecting method selects and at what filter ratio (see the module docstring).

    start, end: the window of selecting steps as fractions of the run, ``0 <= start < end <= 1``.
    every: select on every ``every``-th step of the window (1: each one).
    final_filter_ratio: f at the window's last selecting step, annealed linearly from the run's
    ``filter_ratio`` (None: f stays the run's).
    """

    start: float = 0.0
    end: float = 1.0
    every: int = 1
    final_filter_ratio: float | None = None

    @property
    def always(self) -> bool:
        """Whether it selects on every step at the run's f (the default; the paper's runs)."""
        return self == SelectionSchedule()

    def describe(self) -> str:
        """A short label: ``''`` for the default, else e.g. ``'steps 0-25%, every 2nd, f -> 0'``."""
        if self.always:
            return ""
        parts = []
        if (self.start, self.end) != (0.0, 1.0):
            parts.append(f"steps {100 * self.start:g}-{100 * self.end:g}%")
        if self.every > 1:
            parts.append(f"every {self.every}")
        if self.final_filter_ratio is not None:
            parts.append(f"f -> {self.final_filter_ratio:g}")
        return ", ".join(parts)


def selecting_steps(schedule: SelectionSchedule, steps: int) -> range:
    """The steps (0-based) of a ``steps``-step run on which ``schedule`` lets the method select (before the
    filter ratio is applied: an annealed f may still leave one of them with B = b)."""
    first, stop = round(schedule.start * steps), round(schedule.end * steps)
    return range(first, max(first, stop), schedule.every)


def filter_ratio_at(schedule: SelectionSchedule, step: int, *, steps: int, filter_ratio: float) -> float:
    """f of step ``step`` (0-based) of a ``steps``-step run whose filter ratio is ``filter_ratio``; 0.0 on a
    step the schedule does not select on."""
    window = selecting_steps(schedule, steps)
    if step not in window:
        return 0.0
    if schedule.final_filter_ratio is None or len(window) == 1:
        return filter_ratio
    u = window.index(step) / (len(window) - 1)
    return filter_ratio + (schedule.final_filter_ratio - filter_ratio) * u


def super_batch_at(
    schedule: SelectionSchedule,
    step: int,
    *,
    steps: int,
    batch_size: int,
    filter_ratio: float,
    world: int = 1,
) -> int:
    """B of step ``step``: ``round(b / (1 - f))`` at that step's f, rounded to a multiple of ``world`` (each
    rank holds B / W) and never below b. The step selects iff the result exceeds ``batch_size``."""
    f = filter_ratio_at(schedule, step, steps=steps, filter_ratio=filter_ratio)
    return max(batch_size, world * round(batch_size / (1.0 - f) / world))


def super_batches(
    schedule: SelectionSchedule, *, steps: int, batch_size: int, filter_ratio: float, world: int = 1
) -> np.ndarray:
    """``super_batch_at`` of every step of the run, ``[steps]`` int64 (vectorised: the same numbers)."""
    t = np.arange(steps)
    window = selecting_steps(schedule, steps)
    inside = (t >= window.start) & (t < window.stop) & ((t - window.start) % schedule.every == 0)
    f = np.zeros(steps)
    if schedule.final_filter_ratio is None or len(window) <= 1:
        f[inside] = filter_ratio
    else:
        u = (t[inside] - window.start) // schedule.every / (len(window) - 1)
        f[inside] = filter_ratio + (schedule.final_filter_ratio - filter_ratio) * u
    # Python's round (half to even) per value, as super_batch_at does: np.round is also half to even
    sizes = world * np.round(batch_size / (1.0 - f) / world)
    return np.maximum(batch_size, sizes).astype(np.int64)


def run_flops(sizes: np.ndarray, step_flops: Callable[[int], float]) -> float:
    """Total FLOPs of a run whose steps draw ``sizes`` candidates, ``step_flops(B)`` each."""
    values, counts = np.unique(sizes, return_counts=True)
    return float(sum(step_flops(int(v)) * int(c) for v, c in zip(values, counts, strict=True)))


def steps_for_flops(
    budget: float,
    step_flops: Callable[[int], float],
    schedule: SelectionSchedule,
    *,
    batch_size: int,
    filter_ratio: float,
    world: int = 1,
) -> int:
    """The most steps a run can take whose summed per-step FLOPs, ``step_flops(B)`` for a step drawing B
    candidates, do not exceed ``budget``: what a run *scheduled* for that budget sets as its ``steps``, so
    that its learning-rate schedule (and this selection schedule, in fractions of the run) completes there.

    A ValueError when not even one step fits.
    """
    largest = round(batch_size / (1.0 - max(filter_ratio, schedule.final_filter_ratio or 0.0)))
    # a selecting step's cost is affine in B, so its cheapest is at either end of (b, largest]
    ends = {batch_size, min(batch_size + world, largest), max(batch_size, largest)}
    cheapest = min(step_flops(size) for size in ends)
    if cheapest <= 0:
        raise ValueError(f"a step must cost more than 0 FLOPs, got {cheapest}")
    best = 0
    for steps in range(1, int(budget // cheapest) + 1):
        sizes = super_batches(
            schedule, steps=steps, batch_size=batch_size, filter_ratio=filter_ratio, world=world
        )
        if run_flops(sizes, step_flops) <= budget:
            best = steps
    if best == 0:
        raise ValueError(f"a budget of {budget:.4g} FLOPs does not cover one step ({cheapest:.4g})")
    return best
