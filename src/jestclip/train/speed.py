"""How a run's steps use the device: precision, a bf16 scoring copy, compilation and pinned copies.

None of these changes the method (what is scored, selected and learned); each changes how fast a step runs
and, for the precision switches, the rounding of its numbers. ``TrainConfig.speed`` holds them; a run may
resume with other values (they are not part of the training state).

- ``precision``: ``"auto"`` (bf16 autocast on CUDA, float32 on the CPU: the CPU path stays exact),
  ``"bf16-autocast"`` (on any device) or ``"float32"`` (no autocast anywhere).
- ``bf16_scoring``: the scoring forward (no gradients) runs a bfloat16 copy of the learner whose weights are
  refreshed from the float32 ones once per selecting step, with autocast off: no per-op casts of weights or
  activations (autocast's ``aten::copy_`` was 105 of the scoring forward's 454 ms on an H200, ViT-B/16,
  B = 2,560; docs/benchmarks.md). The logit scale and bias stay the learner's float32 ones.
- ``compile``: ``torch.compile`` mode of the learner's two transformers (and the scoring copy's):
  ``"off"``, ``"default"``, ``"reduce-overhead"`` (CUDA graphs: for small, launch-bound models) or
  ``"max-autotune"``; ``compile_backend`` is torch.compile's backend (``"inductor"``; ``"aot_eager"`` traces
  without generating code, as the CPU tests do). Compiled in place (``nn.Module.compile``): checkpoints keep
  their keys, so a run resumes with compilation switched either way.
- ``pin_memory``: on CUDA, the loader's batches in page-locked memory (its pin thread) and copied to the
  device without blocking; ignored on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "COMPILE_MODES",
    "PRECISIONS",
    "ScoringCopy",
    "SpeedConfig",
    "autocast",
    "compile_problem",
    "compile_towers",
    "prepare_learner",
]

PRECISIONS: tuple[str, ...] = ("auto", "bf16-autocast", "float32")
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class SpeedConfig:
    """How steps use the device (module docstring); checked with the run's config (``validation.CHECKS``).
    The defaults are what jestclip did before the section existed, except ``pin_memory`` (which changes no
    number)."""

    precision: str = "auto"
    bf16_scoring: bool = False
    compile: str = "off"
    compile_backend: str = "inductor"
    pin_memory: bool = True

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the steps on ``device`` (None: float32, no autocast)."""
        if self.precision == "bf16-autocast" or (self.precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None

    def pins(self, device: torch.device) -> bool:
        """Whether batches bound for ``device`` are page-locked (CUDA only)."""
        return self.pin_memory and device.type == "cuda"


def autocast(cfg: SpeedConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a step on ``device`` under ``cfg.precision`` (a no-op for float32)."""
    dtype = cfg.autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def towers(model: nn.Module) -> Iterator[nn.Module]:
    """The learner's transformers, where its time goes: the image tower's (which the approximate encoders
    call too, ``models.approx``) and the text tower's (``model.transformer``, or ``model.text``'s)."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no image tower (.visual): not an open_clip model")
    yield getattr(visual, "transformer", visual)
    text = getattr(model, "transformer", None)
    if text is None:
        text = getattr(model, "text", None)
    if text is not None:
        yield text


def compile_problem(cfg: SpeedConfig, device: torch.device) -> str | None:
    """Why ``cfg``'s compilation cannot run on ``device`` (None: it can, or nothing is compiled): inductor
    needs Triton on CUDA and a C++ compiler on the CPU. torch.compile itself fails only at the first step,
    deep in a traceback; ``startup.build_state`` asks this first and raises a ``ConfigError``."""
    if cfg.compile == "off" or cfg.compile_backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "needs Triton on CUDA (it ships with torch's CUDA wheels); set speed.compile=off"
    elif device.type == "cpu":
        names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names if name):
            problem = "needs a C++ compiler on the CPU (g++, c++ or clang++ on PATH, or CXX)"
            return f"{problem}; set speed.compile=off"
    return None


def compile_towers(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """Compile ``towers(model)`` in place with ``torch.compile`` (``mode`` of ``COMPILE_MODES``; ``"off"``:
    nothing) and return ``model``; its ``state_dict`` keys are unchanged. Compilation happens at the first
    call of each input shape (a selecting step has two: the B candidates scored, the b learned)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return model
    for tower in towers(model):
        tower.compile(mode=None if mode == "default" else mode, backend=backend)
    return model


class ScoringCopy:
    """A bfloat16 copy of the learner for the scoring forward, refreshed from the learner's weights (one
    fused cast) before each use: ``copy.scorer(model)`` is the copy, equal to ``model`` rounded to bf16.

    Raises ValueError for a model whose parameters are not all float32 (nothing to round)."""

    def __init__(self, model: nn.Module, cfg: SpeedConfig) -> None:
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError("speed.bf16_scoring needs a float32 learner")
        self.module = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
        self._pairs = [
            (mine, theirs)
            for (_, mine), (_, theirs) in zip(_tensors(self.module), _tensors(model), strict=True)
            if theirs.is_floating_point()
        ]
        compile_towers(self.module, cfg.compile, cfg.compile_backend)

    @torch.no_grad()
    def scorer(self, model: nn.Module) -> nn.Module:
        """The copy with ``model``'s current weights (what was learned up to now), rounded to bf16."""
        mine = [m for m, _ in self._pairs]
        torch._foreach_copy_(mine, [t.detach() for _, t in self._pairs])
        return self.module


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def prepare_learner(model: nn.Module, cfg: SpeedConfig, *, selects: bool) -> ScoringCopy | None:
    """Apply ``cfg`` to a freshly built learner: its bf16 scoring copy (when ``cfg.bf16_scoring`` and the
    method ``selects``), taken first so that it copies the plain modules, then ``compile_towers`` on both.
    Returns the copy (None when off)."""
    copy_ = ScoringCopy(model, cfg) if cfg.bf16_scoring and selects else None
    compile_towers(model, cfg.compile, cfg.compile_backend)
    return copy_
