"""The training methods, one description each.

A ``Method`` says what a step scores candidates with (the learner, exactly or approximately, or nothing),
which selector it uses (a key of ``selection.selectors.SELECTORS``), whether it needs reference embeddings
(per scoring rule, or for its loss), what part of its selection it learns approximately, which loss it learns
with, and so what a step costs (appendix A.4). The steps, the run loop, FLOP accounting, config validation
and the report all read these facts from here; adding a method is one ``Method`` below and, if no existing
step composes it, its step function in ``steps.py``. This module names the step functions and loss
functions; ``steps`` does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jestclip.models.approx import Approximation
from jestclip.models.flops import ForwardFlops, StepFlops, step_flops
from jestclip.selection.scoring import scoring_uses
from jestclip.selection.selectors import SELECTORS
from jestclip.train import steps
from jestclip.train.steps import StepOutput, StepSettings, SuperBatchTensors

__all__ = ["METHODS", "Method", "get_method", "run_step", "step_method"]


@dataclass(frozen=True)
class Method:
    """What one training method does in a step; see the module docstring."""

    name: str
    summary: str
    # step(method, model, batch, cfg, generator, world_size=, learn_module=, scorer=)
    step: Callable[..., StepOutput]
    selector: str | None = None  # a SELECTORS key; None: learn on the batch as drawn (super-batch = batch)
    scores_approx: bool = False  # the learner scores candidates with its approximation ``cfg.approx``
    learns_approx: bool = False  # a ``cfg.approx_fraction`` share of the selection is learned approximately
    needs_keep_list: bool = False  # trains only on the pairs a static filter kept (``TrainConfig.keep_list``)
    # the loss it learns with (this rank's share): steps.contrastive_learning_loss's signature
    learning_loss: Callable[..., Tensor] = steps.contrastive_learning_loss
    reference_in_loss: bool = False  # the loss takes the reference's embeddings (whether it selects or not)

    def __post_init__(self) -> None:
        if self.selector is not None and self.selector not in SELECTORS:
            raise ValueError(
                f"method {self.name!r}: selector must be one of {tuple(SELECTORS)} or None, "
                f"got {self.selector!r}"
            )

    @property
    def selects(self) -> bool:
        return self.selector is not None

    def scores_with_learner(self, scoring: str) -> bool:
        """Whether a step runs the learner over the super-batch to score it."""
        return self.selects and scoring_uses(scoring)[0]

    def needs_reference(self, scoring: str) -> bool:
        """Whether a step needs the reference model's embeddings of the super-batch: to score it, or to
        learn with them."""
        return self.reference_in_loss or (self.selects and scoring_uses(scoring)[1])

    def scoring_approx(self, cfg: StepSettings) -> Approximation | None:
        """The approximation the learner scores with (None: the exact learner)."""
        return cfg.approx if self.scores_approx else None

    def learned_approx_fraction(self, cfg: StepSettings) -> float:
        """Share λ of the selected batch learned with the approximate learner."""
        return cfg.approx_fraction if self.learns_approx else 0.0

    @property
    def uses_approximation(self) -> bool:
        return self.scores_approx or self.learns_approx

    def super_batch(self, batch_size: int, filter_ratio: float) -> int:
        """Candidates per step: B = b / (1 - f) for a selecting method, b otherwise."""
        if not self.selects:
            return batch_size
        if not 0.0 <= filter_ratio < 1.0:
            raise ValueError(f"filter_ratio must be in [0, 1), got {filter_ratio}")
        return round(batch_size / (1.0 - filter_ratio))

    def step_flops(
        self,
        cfg: StepSettings,
        *,
        super_batch: int,
        learner: ForwardFlops,
        approx_learner: ForwardFlops | None = None,
        reference: ForwardFlops | None = None,
    ) -> StepFlops:
        """FLOPs of one step of this method with ``cfg``; ``reference`` only when it is not cached."""
        scorer = None
        if self.scores_with_learner(cfg.scoring):
            scorer = approx_learner if self.scores_approx else learner
            if scorer is None:
                raise ValueError(f"{self.name} scores with the approximate learner: give its FLOPs")
        return step_flops(
            batch=cfg.batch_size,
            super_batch=super_batch if self.selects else cfg.batch_size,
            learner=learner,
            scorer=scorer,
            approx_learner=approx_learner,
            approx_fraction=self.learned_approx_fraction(cfg),
            reference=reference if self.needs_reference(cfg.scoring) else None,
        )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("iid", "learn on the whole batch as drawn", steps.learn_batch_step),
        Method(
            "filter",
            "learn on the whole batch as drawn from the pairs a static reference-score filter kept",
            steps.learn_batch_step,
            needs_keep_list=True,
        ),
        Method(
            "jest",
            "score with the learner, select jointly, learn on the selection",
            steps.select_and_learn_step,
            selector="joint",
        ),
        Method(
            "independent",
            "as jest, with independent prioritisation as the selector",
            steps.select_and_learn_step,
            selector="independent",
        ),
        Method(
            "flexi-jest",
            "score with the approximate learner, select jointly, learn on a mix of full and approximate",
            steps.select_and_learn_step,
            selector="joint",
            scores_approx=True,
            learns_approx=True,
        ),
        Method(
            "drrho",
            "learn on the whole batch as drawn with the DRRho-style loss: learner minus reference",
            steps.learn_batch_step,
            learning_loss=steps.steered_learning_loss,
            reference_in_loss=True,
        ),
    )
}


def get_method(name: str) -> Method:
    """The description of method ``name``; a ValueError lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def step_method(cfg: StepSettings, select: bool = True) -> Method:
    """The method a step of ``cfg.method`` runs: its own, or, on a step its selection schedule does not
    select on (``select=False``), IID's: learn on the whole batch as drawn, exactly (``train.schedule``)."""
    method = get_method(cfg.method)
    return method if select or not method.selects else METHODS["iid"]


def run_step(
    model: nn.Module,
    batch: SuperBatchTensors,
    cfg: StepSettings,
    generator: torch.Generator | None = None,
    *,
    select: bool = True,
    world_size: int = 1,
    learn_module: nn.Module | None = None,
    scorer: nn.Module | None = None,
) -> StepOutput:
    """One training step of ``cfg.method`` on a super-batch already on the device; with ``select=False`` (a
    step its selection schedule does not select on) an IID step on a batch of ``cfg.batch_size``. ``scorer``:
    a bf16 copy of ``model`` with its current weights (``speed.ScoringCopy``) that runs the scoring forward.

    With ``world_size > 1`` (torch.distributed initialised), ``batch`` is this rank's shard of the super-batch
    and ``cfg.batch_size`` the global b; each rank learns on its b / W picks through ``learn_module``, the
    DDP-wrapped ``distributed.data_parallel(model, device)`` (required: its backward averages the gradients),
    and back-propagates its share of the loss, whose value is that of the whole selection. Counts in the
    output are global. On one process ``learn_module`` defaults to the model itself.
    """
    method = step_method(cfg, select)
    return method.step(
        method, model, batch, cfg, generator, world_size=world_size, learn_module=learn_module, scorer=scorer
    )
