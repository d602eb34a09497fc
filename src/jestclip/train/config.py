"""Run configuration: one dataclass tree, built by a recipe file and adjusted by ``key=value`` overrides.

A recipe (``configs/*.py``) defines ``get_config(quick: bool = False) -> TrainConfig``; ``quick`` is the small
local mode. Overrides use dotted paths into the tree: ``steps=100 method.batch_size=64 optim.lr=3e-4``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jestclip.train.optim import OptimConfig
from jestclip.train.schedule import super_batch_at, super_batches
from jestclip.train.settings import MethodConfig
from jestclip.train.speed import SpeedConfig
from jestclip.train.validation import ConfigError, field_types, validate

__all__ = [
    "ConfigError",
    "MethodConfig",
    "SpeedConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_recipe",
    "to_dict",
    "validate",
]


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/run"
    model: str = "jest-tiny"
    init_checkpoint: str | None = None  # start from these weights instead of a random init
    data: str = "data/bench/pool"  # shards: directory, brace pattern or path
    reference_cache: str | None = "reference"  # sidecar name of the cached reference embeddings (None: none)
    reference_fingerprint: str | None = None  # when set, the reference cache must hold this model
    # a keep list written by `jestclip filter` (its directory): the stream reads only the pairs it keeps
    # (any method; required by "filter"). None: every pair
    keep_list: str | None = None
    reference_cache_dir: str | None = None  # the sidecars' directory (None: beside each local shard)
    filter_ratio: float = 0.8  # f: the super-batch is B = b / (1 - f); ignored by methods that do not select
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # precision, compilation, pinned copies
    steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # the newest checkpoint-STEP.pt files kept in the run directory
    max_bad_steps: int = 10  # non-finite steps in a row that stop the run (TrainingDiverged)
    stop_after: int | None = None  # checkpoint and stop at this step (a planned interruption)
    eval_data: str | None = None  # eval suites (benchmark root, its eval/ or one suite); None: no evaluation
    eval_every: int = 0  # evaluate at step 0, every this many steps and at the end (0: only at the end)
    eval_limit: int | None = None  # samples per suite (None: all)
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available
    num_workers: int = 2
    # decode JPEGs at the smallest libjpeg scale still covering the learner's input (data.open_image)
    draft_decode: bool = False
    # decode the shards once and train from memory (data.pool.MemoryPool; refused when it would not fit)
    # instead of streaming them; the same guarantees, another sample order
    data_in_memory: bool = False

    def __post_init__(self) -> None:
        validate(self)
        if self.keep_list is None and self.method.description.needs_keep_list:
            problem = (
                f"must be set for method {self.method.method!r}: the --out directory of `jestclip filter`"
            )
            raise ConfigError("keep_list", None, problem)
        method = self.method.description
        if self.reference_cache is None and method.needs_reference(self.method.scoring):
            why = (
                "its loss uses the reference's cached embeddings"
                if method.reference_in_loss
                else f"its scoring {self.method.scoring!r} uses the reference's cached embeddings"
            )
            problem = f"must be set for method {self.method.method!r}: {why}"
            raise ConfigError("reference_cache", None, problem)

    @property
    def super_batch(self) -> int:
        """B at the run's filter ratio: candidates per selecting step (b when the method does not select)."""
        return self.method.description.super_batch(self.method.batch_size, self.filter_ratio)

    def super_batch_at(self, step: int, world: int = 1) -> int:
        """B of step ``step`` (0-based) under the method's selection schedule (``schedule.super_batch_at``;
        b when the method does not select). The step selects iff this exceeds ``method.batch_size``."""
        if not self.method.description.selects:
            return self.method.batch_size
        return super_batch_at(
            self.method.schedule,
            step,
            steps=self.steps,
            batch_size=self.method.batch_size,
            filter_ratio=self.filter_ratio,
            world=world,
        )

    def max_super_batch(self, world: int = 1) -> int:
        """The largest B any step of the run draws."""
        if not self.method.description.selects:
            return self.method.batch_size
        if self.method.schedule.always:
            return self.super_batch
        return int(
            super_batches(
                self.method.schedule,
                steps=self.steps,
                batch_size=self.method.batch_size,
                filter_ratio=self.filter_ratio,
                world=world,
            ).max()
        )


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an older jestclip, with the defaults of the keys added since (nested too).

    A key added to the config must therefore default to what jestclip did before the key existed.
    """

    def merged(default: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        out = {**default, **values}
        for key, value in default.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                out[key] = merged(value, values[key])
        return out

    return merged(to_dict(TrainConfig()), saved)


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """The config dataclass ``cls`` from a (nested) dict; unknown keys and non-dict sections are errors."""
    if isinstance(data, cls):
        return data
    types_ = field_types(cls)
    if not isinstance(data, dict):
        raise ConfigError(
            prefix.rstrip(".") or "(the whole config)",
            data,
            f"is a section; set its keys as {prefix}KEY=VALUE (keys: {list(types_)})",
        )
    unknown = [key for key in data if key not in types_]
    if unknown:
        raise ValueError(f"config: unknown key {prefix + str(unknown[0])!r}; known here: {list(types_)}")
    return cls(
        **{
            key: _build(types_[key], value, f"{prefix}{key}.")
            if dataclasses.is_dataclass(types_[key])
            else value
            for key, value in data.items()
        }
    )


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated ``TrainConfig`` from a dict such as ``to_dict`` gives (missing keys take defaults)."""
    return _build(TrainConfig, data)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as a path or a method name


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides (dotted keys, JSON values or bare strings); unknown keys are errors."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r}; known here: {sorted(node)}")
        node[parts[-1]] = _parse_value(value)
    return from_dict(data)


def load_recipe(path: str | Path, *, quick: bool = False) -> TrainConfig:
    """Run ``get_config(quick)`` of a recipe file; any failure is a one-line ValueError naming the file
    (a FileNotFoundError when it does not exist)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"recipe {path} is a directory, not a recipe file (configs/*.py)")
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jestclip_recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"recipe {path} is not a Python file (configs/*.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ValueError(f"recipe {path} defines no get_config(quick=False)")
        cfg = get_config(quick=quick)
    except ValueError as exn:
        if str(exn).startswith(f"recipe {path}"):
            raise
        raise ValueError(f"recipe {path}: {_one_line(exn)}") from exn
    except Exception as exn:
        raise ValueError(f"recipe {path}: {type(exn).__name__}: {_one_line(exn)}") from exn
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"recipe {path}: get_config returned {type(cfg).__name__}, not TrainConfig")
    return cfg


def _one_line(exn: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exn).splitlines() if line.strip()) or type(exn).__name__
