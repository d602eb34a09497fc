"""A run directory: the one place that knows its layout, and reading and writing its files.

::

    RUN/config.json     the resolved TrainConfig, written when a run starts
    RUN/metrics.jsonl   one JSON line per logged step and per evaluation (``eval/...`` metrics)
    RUN/tb/             TensorBoard events
    RUN/checkpoint.pt   the full training state, replaced atomically
    RUN/model.pt        the final weights only, written when the run finishes

Training (``train.loop``), evaluation, the report, the demo and the selection diagnostics all go through
``RunDir``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["RunDir", "atomic_save"]


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunDir:
    """The files of one training run under ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"

    @property
    def finished(self) -> bool:
        """Whether training wrote its final weights."""
        return self.model_file.exists()

    def read_config(self) -> dict[str, Any]:
        """The resolved config as a dict; a ValueError when this is not a run directory."""
        if not self.config_file.exists():
            raise ValueError(f"{self.path} is not a training run: {self.config_file.name} is missing")
        return json.loads(self.config_file.read_text(encoding="utf-8"))

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(config, indent=1), encoding="utf-8")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics line in file order; a ValueError names the file and line of a bad one."""
        if not self.metrics_file.exists():
            raise ValueError(f"{self.path} is not a training run: {self.metrics_file.name} is missing")
        rows = []
        for number, line in enumerate(self.metrics_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exn:
                raise ValueError(f"{self.metrics_file}:{number}: not a JSON line ({exn})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{self.metrics_file}:{number}: a metrics line needs a 'step'")
            rows.append(row)
        return rows

    def open_metrics(self) -> TextIO:
        """The metrics file, opened for appending one JSON line at a time."""
        return open(self.metrics_file, "a", encoding="utf-8")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_save(state, self.checkpoint_file)

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        return torch.load(self.checkpoint_file, map_location=device, weights_only=True)

    def save_weights(self, state_dict: dict[str, Any]) -> None:
        atomic_save(state_dict, self.model_file)

    def weights(self) -> Path:
        """The run's weights: ``model.pt`` when finished, else its latest checkpoint (both load with
        ``create_model(checkpoint=...)``); a ValueError when it has neither yet.
        """
        for path in (self.model_file, self.checkpoint_file):
            if path.exists():
                return path
        raise ValueError(f"run {self.path} has no {self.model_file.name} or {self.checkpoint_file.name} yet")
