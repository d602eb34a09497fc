"""A run directory: the one place that knows its layout, and reading and writing its files.

::

    RUN/config.json                 the resolved TrainConfig, written when a run starts
    RUN/metrics.jsonl               one JSON line per logged step and per evaluation (``eval/...`` metrics)
    RUN/tb/                         TensorBoard events (like metrics.jsonl, each step once after a resume)
    RUN/checkpoint-000200.pt        the full training state at step 200; the newest ``keep`` are kept
    RUN/model.pt                    the final weights only, written when the run finishes
    RUN/reference.json              the reference cache a run trains with (name, model, fingerprint)
    RUN/keep_list.json              the keep list a run trains with (path, keep.json's sha256, pairs kept)

Every file is written to ``NAME.tmp``, flushed to disk and renamed over ``NAME`` (a crash leaves the old file
or the new one, never half of one; ``*.tmp`` leftovers are removed when a run starts). Checkpoints and weights
holding a non-finite value are refused. Readers use ``latest_checkpoint()`` / ``weights()`` /
``load_checkpoint()``; the newest checkpoint that does not load is passed over with a warning. A run directory
written before numbered checkpoints (``RUN/checkpoint.pt``) still reads as its oldest checkpoint.

Training (``train.loop``), evaluation, the report, the demo and the selection diagnostics all go through
``RunDir``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from jestclip.data.files import atomic_write

__all__ = ["CheckpointWriteError", "NonFiniteStateError", "RunDir", "atomic_save", "first_non_finite"]

_CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")
_LEGACY_CHECKPOINT = "checkpoint.pt"  # the single checkpoint of run directories from before numbering


class CheckpointWriteError(RuntimeError):
    """A checkpoint or the weights could not be written (disk full, ...); the previous checkpoint is kept."""


class NonFiniteStateError(ValueError):
    """A state to be written holds a NaN or infinity; nothing was written."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def first_non_finite(obj: Any, prefix: str = "") -> str | None:
    """The dotted name of the first floating-point tensor in ``obj`` (nested dicts, lists, tuples) holding a
    NaN or infinity, else None (plain numbers are not checked: a config may say ``inf``)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return None if bool(torch.isfinite(obj).all()) else prefix or "tensor"
        return None
    items: Iterator[tuple[Any, Any]] = iter(())
    if isinstance(obj, dict):
        items = iter(obj.items())
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _tf_records(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """``(start, end, event)`` of each whole record of a TFRecord file (an event file: a little-endian
    uint64 length, its 4-byte CRC, the payload, the payload's 4-byte CRC), the payload parsed as a
    TensorBoard ``Event``. Stops at a record cut short or one whose payload is no Event (the tail a killed
    writer left); the CRCs are not checked."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    start = 0
    while start + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, start)
        end = start + 12 + length + 4
        if end > len(data):
            return
        try:
            event = Event.FromString(data[start + 12 : start + 12 + length])
        except DecodeError:
            return
        yield start, end, event
        start = end


def _write_error(exn: OSError) -> str:
    """``no space left on device`` for ENOSPC, the OS's words otherwise."""
    if exn.errno == errno.ENOSPC:
        return "no space left on device"
    return (exn.strerror or str(exn) or type(exn).__name__).lower()


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
    def model_file(self) -> Path:
        return self.path / "model.pt"

    @property
    def reference_file(self) -> Path:
        return self.path / "reference.json"

    @property
    def keep_list_file(self) -> Path:
        return self.path / "keep_list.json"

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of step ``step`` is written."""
        return self.path / f"checkpoint-{step:06d}.pt"

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
        atomic_write(self.config_file, lambda f: f.write(json.dumps(config, indent=1).encode()))

    def read_reference(self) -> dict[str, Any] | None:
        """What ``write_reference`` recorded about the run's reference cache, or None."""
        if not self.reference_file.exists():
            return None
        return json.loads(self.reference_file.read_text(encoding="utf-8"))

    def write_reference(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.reference_file, lambda f: f.write(json.dumps(record, indent=1).encode()))

    def read_keep_list(self) -> dict[str, Any] | None:
        """What ``write_keep_list`` recorded about the run's keep list, or None."""
        if not self.keep_list_file.exists():
            return None
        return json.loads(self.keep_list_file.read_text(encoding="utf-8"))

    def write_keep_list(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.keep_list_file, lambda f: f.write(json.dumps(record, indent=1).encode()))

    def clean_tmp(self) -> list[Path]:
        """Remove the ``*.tmp`` files an interrupted write left behind; the paths removed."""
        leftovers = sorted(self.path.glob("*.tmp")) if self.path.is_dir() else []
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

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

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics lines a run resumed at ``step`` will not write again: those of steps before it
        and, for ``step > 0``, those at it (one per kind: training line, evaluation line). Lines that are not
        JSON (a write cut short) are dropped with a warning. The file is rewritten atomically."""
        if not self.metrics_file.exists():
            return
        kept: dict[tuple[int, bool], str] = {}
        for number, line in enumerate(self.metrics_file.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                at = int(row["step"])
            except (ValueError, TypeError, KeyError):
                if line.strip():
                    warnings.warn(
                        f"{self.metrics_file}:{number}: dropped a line that is not a metrics line",
                        stacklevel=2,
                    )
                continue
            if at < step or (at == step and step > 0):
                kind = (at, any(key.startswith("eval/") for key in row))
                kept.pop(kind, None)  # a step logged twice (before resume truncation existed): the last wins
                kept[kind] = line
        text = "".join(line + "\n" for line in kept.values())
        atomic_write(self.metrics_file, lambda f: f.write(text.encode()))

    def truncate_tensorboard(self, step: int) -> list[Path]:
        """Drop the TensorBoard events a run resumed at ``step`` will write again, as ``truncate_metrics``
        does for the metrics lines: a summary event of a step after it (or, for ``step == 0``, any). A run
        killed at step 7 whose checkpoint is step 4 logged steps 5-7, and its resumed run logs them again:
        without this TensorBoard held both (``wall_s`` going backwards) while metrics.jsonl held each once.
        Each event file holding such events is rewritten atomically, record by record (the kept records'
        bytes unchanged); a record cut short by the crash is dropped. Returns the files rewritten."""
        if not self.tensorboard_dir.is_dir():
            return []
        rewritten = []
        for path in sorted(self.tensorboard_dir.glob("*tfevents*")):
            if path.name.endswith(".tmp") or not path.is_file():
                continue
            data = path.read_bytes()
            kept, dropped, end = [], 0, 0
            for start, end, event in _tf_records(data):
                again = event.HasField("summary") and (event.step > step or step == 0)
                dropped += again
                if not again:
                    kept.append(data[start:end])
            if not dropped and end == len(data):
                continue
            body = b"".join(kept)
            atomic_write(path, lambda f, body=body: f.write(body))
            rewritten.append(path)
        return rewritten

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints, newest (highest step) first; a legacy ``checkpoint.pt`` comes last."""
        if not self.path.is_dir():
            return []
        numbered = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))]
        found = [p for _, p in sorted(numbered, reverse=True)]
        legacy = self.path / _LEGACY_CHECKPOINT
        return [*found, legacy] if legacy.exists() else found

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint file, or None before the first one."""
        found = self.checkpoints()
        return found[0] if found else None

    @staticmethod
    def checkpoint_step(path: Path) -> int | None:
        """The step in a checkpoint's file name (None for a legacy ``checkpoint.pt``)."""
        match = _CHECKPOINT.fullmatch(path.name)
        return int(match.group(1)) if match else None

    def describe(self, path: Path | None) -> str:
        """``RUN/checkpoint-000200.pt (step 200)``, for messages; ``none`` without a checkpoint."""
        if path is None:
            return "none"
        step = self.checkpoint_step(path)
        return f"{path}" if step is None else f"{path} (step {step})"

    def save_checkpoint(self, state: dict[str, Any], *, keep: int = 2) -> Path:
        """Write ``state`` as the checkpoint of its step (``state['counters']['step']``) and keep the newest
        ``keep`` checkpoints (any checkpoint of a later step is from an abandoned stretch of the run and
        goes too). A ``NonFiniteStateError`` names a NaN / infinite tensor, a ``CheckpointWriteError`` a
        failed write; in both cases nothing changed."""
        previous = self.latest_checkpoint()
        path = self.checkpoint_path(int(state["counters"]["step"]))
        self._write_state(state, path, previous)
        for old in self.checkpoints():
            step = self.checkpoint_step(old)
            if step is not None and step > self.checkpoint_step(path):
                old.unlink(missing_ok=True)
        for old in self.checkpoints()[max(keep, 1) :]:
            old.unlink(missing_ok=True)
        return path

    def save_weights(self, state_dict: dict[str, Any]) -> None:
        """Write the final weights (refused like a checkpoint when non-finite or the write fails)."""
        self._write_state(state_dict, self.model_file, self.latest_checkpoint())

    def _write_state(self, state: dict[str, Any], path: Path, previous: Path | None) -> None:
        bad = first_non_finite(state)
        if bad is not None:
            raise NonFiniteStateError(f"refusing to write {path}: {bad} holds non-finite values")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            atomic_save(state, path)
        except OSError as exn:
            kept = f"previous checkpoint {self.describe(previous)} kept" if previous else "no checkpoint yet"
            raise CheckpointWriteError(f"checkpoint: {_write_error(exn)} writing {path}; {kept}") from None

    def load_latest(self, device: torch.device | str = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """``(path, state)`` of the newest checkpoint that loads, or None when there is none; a checkpoint
        that does not load (truncated, corrupt) is passed over with a one-line warning naming it. A
        ValueError when there are checkpoints but none loads."""
        found = self.checkpoints()
        for i, path in enumerate(found):
            try:
                return path, torch.load(path, map_location=device, weights_only=True)
            except Exception as exn:  # any unreadable file: fall back to the previous one
                reason = f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"
                if i + 1 == len(found):
                    names = ", ".join(str(p) for p in found)
                    raise ValueError(
                        f"no checkpoint of {self.path} loads ({names}); last error {reason}"
                    ) from None
                warnings.warn(
                    f"checkpoint {path} does not load ({reason}); using {self.describe(found[i + 1])}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return None

    def set_aside_newer(self, path: Path) -> list[Path]:
        """Rename the checkpoints newer than ``path`` (ones that did not load) to ``NAME.corrupt``, so that
        ``path`` is the latest again; the new names."""
        moved = []
        for old in self.checkpoints():
            if old == path:
                break
            moved.append(old.with_name(old.name + ".corrupt"))
            os.replace(old, moved[-1])
        return moved

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The newest checkpoint that loads (see ``load_latest``); a ValueError when there is none."""
        loaded = self.load_latest(device)
        if loaded is None:
            raise ValueError(f"run {self.path} has no checkpoint yet")
        return loaded[1]

    def weights(self) -> Path:
        """The run's weights: ``model.pt`` when finished, else its latest checkpoint (both load with
        ``create_model(checkpoint=...)``); a ValueError when it has neither yet.
        """
        if self.model_file.exists():
            return self.model_file
        latest = self.latest_checkpoint()
        if latest is not None:
            return latest
        raise ValueError(f"run {self.path} has no {self.model_file.name} or checkpoint yet")
