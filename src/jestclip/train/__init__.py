"""Training: optimisation per appendix A.1 and one step function per method (IID / JEST / independent /
Flexi-JEST). The run loop, checkpoints, reference cache and distributed training are still to come."""

from jestclip.train.optim import OptimConfig, lr_factor, make_optimizer, make_scheduler, param_groups
from jestclip.train.steps import (
    METHODS,
    MethodConfig,
    StepOutput,
    SuperBatchTensors,
    contrastive_loss,
    run_step,
)

__all__ = [
    "METHODS",
    "MethodConfig",
    "OptimConfig",
    "StepOutput",
    "SuperBatchTensors",
    "contrastive_loss",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "param_groups",
    "run_step",
]
