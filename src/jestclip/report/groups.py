"""Runs that differ only in their seed, read as one: a mean curve with a band across seeds."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jestclip.report.runs import AVERAGE, RunLog
from jestclip.train.config import with_defaults
from jestclip.train.methods import Method

__all__ = ["RunGroup", "as_group", "group_seeds"]

# config keys that may differ between the seeds of one group (they change no result, or are the seed)
_SEED_KEYS = {
    "seed",
    "run_dir",
    "num_workers",
    "device",
    "log_every",
    "checkpoint_every",
    "stop_after",
    "reference_cache_dir",  # the same cache, filed elsewhere
}
_SEED_SUFFIX = re.compile(r"[-_.]?(s|seed)\d+$")


@dataclass(frozen=True)
class RunGroup:
    """Runs of one config under different seeds (one run is a group of one), named after their directories
    with a trailing seed suffix (``-s0``, ``_seed1``) dropped."""

    name: str
    runs: tuple[RunLog, ...]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def label(self) -> str:
        return self.runs[0].label

    @property
    def description(self) -> Method:
        return self.runs[0].description

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def seeds(self) -> list[int]:
        return [int(r.config.get("seed", 0)) for r in self.runs]

    def curve(
        self, x: str, metric: str = AVERAGE, *, training: bool = False
    ) -> tuple[list[float], list[float], list[float]]:
        """``(xs, mean, std)`` over the seeds at the steps every seed evaluated (std 0 for one seed); with
        ``training``, at the steps every seed logged ``metric`` (not null) in a training line.

        ``x`` is a counter such as ``examples_learned``, averaged over seeds (equal up to skipped data).
        """
        by_step = [
            {int(r["step"]): r for r in (run.train if training else run.evals) if r.get(metric) is not None}
            for run in self.runs
        ]
        steps = sorted(set.intersection(*(set(s) for s in by_step)))
        xs, mean, std = [], [], []
        for step in steps:
            rows = [s[step] for s in by_step]
            values = [float(r[metric]) for r in rows]
            xs.append(statistics.fmean(float(r[x]) for r in rows))
            mean.append(statistics.fmean(values))
            std.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        return xs, mean, std

    def final(self, metric: str = AVERAGE) -> tuple[float, float]:
        """Mean and standard deviation over seeds of each run's final ``metric``."""
        values = [float(r.final_eval[metric]) for r in self.runs]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def final_eval(self) -> dict[str, Any]:
        """The final evaluation line averaged over seeds (numbers only)."""
        rows = [r.final_eval for r in self.runs]
        keys = [k for k, v in rows[0].items() if isinstance(v, int | float) and all(k in r for r in rows)]
        return {k: statistics.fmean(float(r[k]) for r in rows) for k in keys}


def as_group(run: RunLog | RunGroup) -> RunGroup:
    return run if isinstance(run, RunGroup) else RunGroup(run.name, (run,))


def _seedless(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys seeds may differ in; keys added to jestclip since it was written are
    read as their defaults (what jestclip did before them)."""
    return {k: v for k, v in with_defaults(config).items() if k not in _SEED_KEYS}


def group_seeds(runs: Sequence[RunLog]) -> list[RunGroup]:
    """Group runs whose configs differ only in seed (and bookkeeping keys), in order of first appearance."""
    groups: list[list[RunLog]] = []
    for run in runs:
        for group in groups:
            if _seedless(group[0].config) == _seedless(run.config):
                group.append(run)
                break
        else:
            groups.append([run])
    out = []
    for members in groups:
        if len(members) == 1:
            out.append(RunGroup(members[0].name, (members[0],)))
            continue
        seeds = [r.config.get("seed") for r in members]
        if len(set(seeds)) != len(seeds):
            names = [r.name for r in members]
            raise ValueError(f"runs {names} have the same config and seed: give one of them another seed")
        out.append(RunGroup(_SEED_SUFFIX.sub("", members[0].name) or members[0].name, tuple(members)))
    return out
