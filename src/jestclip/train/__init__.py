"""Training: the methods (one description each), their step functions, optimisation per appendix A.1, the
run configuration and the run loop (``train``)."""

from jestclip.train.config import MethodConfig, TrainConfig, apply_overrides, load_recipe
from jestclip.train.methods import METHODS, Method, get_method, run_step
from jestclip.train.optim import OptimConfig, lr_factor, make_optimizer, make_scheduler, param_groups
from jestclip.train.steps import StepOutput, SuperBatchTensors, contrastive_loss

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "OptimConfig",
    "StepOutput",
    "SuperBatchTensors",
    "TrainConfig",
    "apply_overrides",
    "contrastive_loss",
    "get_method",
    "load_recipe",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "param_groups",
    "run_step",
]
