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

from jestclip.models.approx import Approximation
from jestclip.selection.joint import DEFAULT_GAIN
from jestclip.train.methods import Method, get_method
from jestclip.train.optim import OptimConfig

__all__ = ["MethodConfig", "TrainConfig", "apply_overrides", "from_dict", "load_recipe", "to_dict"]


@dataclass(frozen=True)
class MethodConfig:
    """Which method a run trains with (``methods.METHODS``) and its selection settings."""

    method: str = "jest"
    batch_size: int = 256  # b, the examples learned on per step
    loss: str = "sigmoid"
    scoring: str = "learnability"
    n_chunks: int = 16
    gain: float = DEFAULT_GAIN
    approx: Approximation = "flexi"  # the approximate learner of methods that use one (flexi-jest)
    approx_fraction: float = 0.5  # flexi-jest: share of the selected batch trained approximately
    independent_context: str = "unconditional"  # independent: "unconditional" or "superbatch"
    independent_method: str = "sample"  # independent: "sample" or "topk"

    def __post_init__(self) -> None:
        get_method(self.method)  # a ValueError names the known methods
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.approx_fraction <= 1.0:
            raise ValueError(f"approx_fraction must be in [0, 1], got {self.approx_fraction}")

    @property
    def description(self) -> Method:
        return get_method(self.method)


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/run"
    model: str = "jest-tiny"
    init_checkpoint: str | None = None  # start from these weights instead of a random init
    data: str = "data/bench/pool"  # shards: directory, brace pattern or path
    reference_cache: str | None = "reference"  # sidecar name of the cached reference embeddings (None: none)
    filter_ratio: float = 0.8  # f: the super-batch is B = b / (1 - f); ignored by iid
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 100
    stop_after: int | None = None  # checkpoint and stop at this step (a planned interruption)
    eval_data: str | None = None  # eval suites (benchmark root, its eval/ or one suite); None: no evaluation
    eval_every: int = 0  # evaluate at step 0, every this many steps and at the end (0: only at the end)
    eval_limit: int | None = None  # samples per suite (None: all)
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available
    num_workers: int = 2

    @property
    def super_batch(self) -> int:
        """B: candidates per step (b when the method does not select)."""
        return self.method.description.super_batch(self.method.batch_size, self.filter_ratio)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    data["method"] = MethodConfig(**data.get("method", {}))
    data["optim"] = OptimConfig(**data.get("optim", {}))
    return TrainConfig(**data)


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
    """Run ``get_config(quick)`` of a recipe file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jestclip_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"recipe {path} defines no get_config(quick=False)")
    cfg = module.get_config(quick=quick)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"recipe {path}: get_config returned {type(cfg).__name__}, not TrainConfig")
    return cfg
