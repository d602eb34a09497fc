"""Checking a config: every field against its annotation and a table of ranges and allowed values by dotted
key, one line naming the first bad one (``ConfigError``). Shared by the run's config (``config.TrainConfig``)
and a method's (``settings.MethodConfig``); the allowed values are read where they live, when checked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from jestclip.models.approx import APPROXIMATIONS
from jestclip.selection import LOSSES, SCORINGS, independent
from jestclip.train.methods import METHODS
from jestclip.train.speed import COMPILE_MODES, PRECISIONS

__all__ = ["CHECKS", "ConfigError", "Range", "field_types", "one_of", "type_problem", "validate"]


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; one line naming the key, the value and what is
    allowed: ``config: method.scoring = 'bar' is not one of ('learnability', ...)``."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        super().__init__(f"config: {key} = {value!r} {problem}")
        self.key = key


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (None: unbounded), each end included unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: float) -> str | None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (below or above):
            return None
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"must be {'<' if self.high_open else '<='} {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{low}, {high}{right}"


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def one_of(allowed: Callable[[], tuple]) -> Callable[[Any], str | None]:
    """A check that the value is one of ``allowed()`` (read where the allowed values live)."""
    return lambda value: None if value in allowed() else f"is not one of {tuple(allowed())}"


def _device(value: str) -> str | None:
    if value == "auto":
        return None
    try:
        torch.device(value)
    except RuntimeError:
        return "is not 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1'"
    return None


def _compile_backend(value: str) -> str | None:
    if value == "inductor":  # the default: no need to import dynamo to know it
        return None
    known = tuple(torch._dynamo.list_backends(exclude_tags=()))
    return None if value in known else f"is not one of torch.compile's backends {known}"


# Range and value checks by dotted key; the type of every field comes from its annotation. Keys of fields a
# config does not have (yet) are simply unused.
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "filter_ratio": Range(0.0, 1.0, high_open=True),
    "steps": Range(1),
    "log_every": Range(1),
    "checkpoint_every": Range(1),
    "stop_after": Range(1),
    "eval_every": Range(0),
    "eval_limit": Range(1),
    "seed": Range(0, 2**63 - 1),
    "device": _device,
    "num_workers": Range(0),
    "max_bad_steps": Range(1),
    "keep_checkpoints": Range(1),
    "method.method": one_of(lambda: tuple(METHODS)),
    "method.batch_size": Range(1),
    "method.loss": one_of(lambda: LOSSES),
    "method.scoring": one_of(lambda: SCORINGS),
    "method.n_chunks": Range(1),
    "method.gain": Range(0.0, low_open=True),
    "method.approx": one_of(lambda: APPROXIMATIONS),
    "method.approx_fraction": Range(0.0, 1.0),
    "method.independent_context": one_of(lambda: independent.CONTEXTS),
    "method.independent_method": one_of(lambda: independent.METHODS),
    "method.schedule.start": Range(0.0, 1.0, high_open=True),
    "method.schedule.end": Range(0.0, 1.0, low_open=True),
    "method.schedule.every": Range(1),
    "method.schedule.final_filter_ratio": Range(0.0, 1.0, high_open=True),
    "optim.lr": Range(0.0, low_open=True),
    "optim.weight_decay": Range(0.0),
    "optim.beta1": Range(0.0, 1.0, high_open=True),
    "optim.beta2": Range(0.0, 1.0, high_open=True),
    "optim.eps": Range(0.0),
    "optim.warmup_fraction": Range(0.0, 1.0, high_open=True),
    "optim.grad_clip": Range(0.0, low_open=True),
    "speed.precision": one_of(lambda: PRECISIONS),
    "speed.compile": one_of(lambda: COMPILE_MODES),
    "speed.compile_backend": _compile_backend,
}

_TYPE_NAMES = {int: "an int", float: "a finite number", str: "a string", bool: "true or false"}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_problem(value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit ``annotation`` (None: it fits, or the annotation is not one checked).

    bool is not an int; an int is a float; floats must be finite; ``X | None`` takes None.
    """
    if arms := _union_arms(annotation):
        if all(type_problem(value, arm) for arm in arms):
            return "is not " + " or ".join(_type_name(arm) for arm in arms)
        return None
    if typing.get_origin(annotation) is Literal:
        allowed = typing.get_args(annotation)
        return None if value in allowed else f"is not one of {allowed}"
    if annotation is type(None):
        return None if value is None else "is not None"
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "is not a finite number"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "is not an int"
    if annotation in (str, bool) or dataclasses.is_dataclass(annotation):
        return None if isinstance(value, annotation) else f"is not {_type_name(annotation)}"
    return None


def _union_arms(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of ``X | Y`` (empty for any other annotation)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else ()


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    return _TYPE_NAMES.get(annotation, f"a {getattr(annotation, '__name__', annotation)}")


def _wants_float(annotation: Any) -> bool:
    """Whether an int value of a field so annotated is stored as a float (``float``, ``float | None``)."""
    arms = _union_arms(annotation)
    return annotation is float or (float in arms and int not in arms)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of the config dataclass ``cfg`` (and of the configs nested in it) against its
    annotation and ``CHECKS``; a ``ConfigError`` names the first bad one by its dotted key. Ints given for
    float fields are stored as floats."""
    for name, annotation in field_types(type(cfg)).items():
        key, value = prefix + name, getattr(cfg, name)
        problem = type_problem(value, annotation)
        if problem is None and value is not None and key in CHECKS:
            problem = CHECKS[key](value)
        if problem:
            raise ConfigError(key, value, problem)
        if isinstance(value, int) and not isinstance(value, bool) and _wants_float(annotation):
            object.__setattr__(cfg, name, float(value))
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
