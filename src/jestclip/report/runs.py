"""Read training runs back: the resolved config and the metrics lines of a run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AVERAGE", "RunLog", "load_run"]

AVERAGE = "eval/average"


@dataclass(frozen=True)
class RunLog:
    """One run: ``name`` (its directory name), ``config`` (config.json), ``train`` and ``evals`` (metrics
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
    """Read ``config.json`` and ``metrics.jsonl`` of a run directory; errors name the file and line."""
    path = Path(path)
    config_path, metrics_path = path / "config.json", path / "metrics.jsonl"
    for required in (config_path, metrics_path):
        if not required.exists():
            raise ValueError(f"{path} is not a training run: {required.name} is missing")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    by_step: dict[tuple[bool, int], dict[str, Any]] = {}
    for number, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exn:
            raise ValueError(f"{metrics_path}:{number}: not a JSON line ({exn})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{metrics_path}:{number}: a metrics line needs a 'step'")
        by_step[(AVERAGE in row, int(row["step"]))] = row  # a step logged twice (resumed run): the last wins
    rows = [by_step[k] for k in sorted(by_step, key=lambda k: k[1])]
    return RunLog(
        name=path.name,
        path=path,
        config=config,
        train=[r for r in rows if AVERAGE not in r],
        evals=[r for r in rows if AVERAGE in r],
    )
