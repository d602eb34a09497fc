"""A method's settings: which method a run trains with and its selection settings, checked when built.

``MethodConfig`` is the one class: a run's config holds it (``config.TrainConfig.method``), steps and method
descriptions read it (through the ``steps.StepSettings`` protocol, so that they need not import it). It is
checked when built (``validation.validate``: types, ranges, the method's name against ``methods.METHODS``).
A selector's settings are flat fields here (as in a run's ``config.json``), read by the selector by name
(``selection.selectors``: ``Selector.settings``); a selector with new settings adds its fields here.
The imports inside ``train/`` go one way: ``config`` → ``settings`` → ``methods`` → ``steps`` →
``distributed`` → ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jestclip.models.approx import Approximation
from jestclip.selection.joint import DEFAULT_GAIN
from jestclip.train.methods import Method, get_method
from jestclip.train.schedule import SelectionSchedule
from jestclip.train.validation import ConfigError, validate

__all__ = ["MethodConfig"]


@dataclass(frozen=True)
class MethodConfig:
    """Which method a run trains with (``methods.METHODS``) and its selection settings, checked when built:
    a ``ConfigError`` names the first bad field by its dotted key (``method.scoring``)."""

    method: str = "jest"
    batch_size: int = 256  # b, the examples learned on per step
    loss: str = "sigmoid"
    scoring: str = "learnability"
    n_chunks: int = 16  # the joint selector's chunks per selection (capped at batch_size)
    gain: float = DEFAULT_GAIN
    approx: Approximation = "flexi"  # the approximate learner of methods that use one (flexi-jest)
    approx_fraction: float = 0.5  # flexi-jest: share of the selected batch trained approximately
    independent_context: str = "unconditional"  # the independent selector's: "unconditional" or "superbatch"
    independent_method: str = "sample"  # the independent selector's: "sample" or "topk"
    # on which steps a selecting method selects, and at what filter ratio (default: every step, at f)
    schedule: SelectionSchedule = field(default_factory=SelectionSchedule)

    def __post_init__(self) -> None:
        validate(self, "method.")
        schedule = self.schedule
        if schedule.start >= schedule.end:
            raise ConfigError(
                "method.schedule.end", schedule.end, f"must be > method.schedule.start ({schedule.start:g})"
            )
        if not schedule.always and not self.description.selects:
            raise ConfigError(
                "method.schedule",
                schedule.describe(),
                f"is set but method {self.method!r} does not select (it learns on every batch as drawn)",
            )

    @property
    def description(self) -> Method:
        """What the method does (``methods.METHODS``)."""
        return get_method(self.method)
