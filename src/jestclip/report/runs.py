"""Read training runs back: the resolved config and the metrics lines of a run directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jestclip.train.methods import Method, get_method
from jestclip.train.rundir import RunDir
from jestclip.train.schedule import SelectionSchedule

__all__ = ["AVERAGE", "PRIMARY", "RunLog", "default_metric", "load_run"]

AVERAGE = "eval/average"
# the steadier metric reports compare on when every run logged it: on the benchmark IID's gain is 17x its
# evaluation sd against 4x for AVERAGE (docs/studies/study2.md, "the metric")
PRIMARY = "eval/gallery_r5"


@dataclass(frozen=True)
class RunLog:
    """One run: ``name`` (its directory name), ``config`` (resolved), ``train`` and ``evals`` (metrics
    lines without / with ``eval/...`` metrics, in step order).
    """

    name: str
    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return self.config.get("method", {}).get("method", "?")

    @property
    def label(self) -> str:
        """The method as reports name it: ``jest``, or with its selection schedule ``jest (steps 0-25%)``."""
        schedule = self.config.get("method", {}).get("schedule") or {}
        described = SelectionSchedule(**schedule).describe() if schedule else ""
        return f"{self.method} ({described})" if described else self.method

    @property
    def description(self) -> Method:
        """What the run's method does (``train.methods``); a ValueError for an unknown method."""
        return get_method(self.method)

    def curve(self, x: str, y: str = AVERAGE) -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of the evaluation lines: ``x`` is a counter such as ``examples_learned``."""
        rows = [r for r in self.evals if y in r]
        return [float(r[x]) for r in rows], [float(r[y]) for r in rows]

    @property
    def final_eval(self) -> dict[str, Any]:
        if not self.evals:
            raise ValueError(f"run {self.path} has no evaluation lines (train it with eval_data set)")
        return self.evals[-1]


def load_run(path: str | Path) -> RunLog:
    """Read the config and metrics lines of a run directory; errors name the file and line."""
    run = RunDir(path)
    config = run.read_config()
    by_step: dict[tuple[bool, int], dict[str, Any]] = {}
    for row in run.read_metrics():
        by_step[(AVERAGE in row, int(row["step"]))] = row  # a step logged twice (resumed run): the last wins
    rows = [by_step[k] for k in sorted(by_step, key=lambda k: k[1])]
    return RunLog(
        name=run.name,
        path=run.path,
        config=config,
        train=[r for r in rows if AVERAGE not in r],
        evals=[r for r in rows if AVERAGE in r],
    )


def default_metric(runs: Sequence[RunLog]) -> str:
    """``PRIMARY`` when every run's final evaluation has it (its eval suites have a retrieval task and it was
    logged), else ``AVERAGE``."""
    finals = [run.evals[-1] if run.evals else {} for run in runs]
    return PRIMARY if finals and all(PRIMARY in final for final in finals) else AVERAGE
