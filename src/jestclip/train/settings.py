"""A method's settings as its step and its description read them.

``MethodSettings`` holds the fields; ``config.MethodConfig`` is the same fields checked when built (types,
ranges, the method's name against ``methods.METHODS``), the class a run's config uses. The split keeps the
imports inside ``train/`` one-directional: ``config`` → ``methods`` → ``steps`` → ``distributed`` →
``forward``, each reading the settings from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jestclip.models.approx import Approximation
from jestclip.selection.joint import DEFAULT_GAIN
from jestclip.train.schedule import SelectionSchedule

__all__ = ["MethodSettings"]


@dataclass(frozen=True)
class MethodSettings:
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
    # on which steps a selecting method selects, and at what filter ratio (default: every step, at f)
    schedule: SelectionSchedule = field(default_factory=SelectionSchedule)
