"""Data-parallel learning under torch.distributed, as open_clip trains.

Each rank computes its share of the loss from its own ``b / W`` selected examples (``steps.contrastive_loss``:
neighbour exchange of text features for SigLIP, gathered features for CLIP; no rank builds the ``b × b``
logits; ``steps.steered_learning_loss``: the learner's and the reference's rows all-gathered by
``gather_rows``), and ``data_parallel`` wraps the step's one learning module in ``DistributedDataParallel``,
which averages gradients bucket by bucket while backward still runs. The shares are normalised so that their
mean is the single-process batch loss: the averaged gradient is its gradient; ``valued_at_rank_mean`` reports
that loss. Selecting on a sharded super-batch is each selector's distributed form (``selection.selectors``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from jestclip.train.forward import LearningForward

__all__ = ["data_parallel", "gather_rows", "valued_at_rank_mean"]


def data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``LearningForward(model)`` wrapped in DDP (its parameters are the model's own): the module a step
    learns through under torchrun. Every parameter gets a gradient in every learning step, so DDP needs no
    search for unused ones. Buckets follow DDP's defaults: after the first step they are rebuilt in the order
    backward produces gradients, so each bucket's all-reduce starts while the rest of backward runs."""
    return DistributedDataParallel(
        LearningForward(model), device_ids=[device] if device.type == "cuda" else None
    )


def valued_at_rank_mean(loss: Tensor, group=None) -> Tensor:
    """``loss`` with its own gradient but the value of its mean over the ranks (a step's reported loss is the
    whole batch's, while each rank back-propagates its share)."""
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=group)
    return loss + (mean / dist.get_world_size(group) - loss.detach())


def gather_rows(tensor: Tensor, *, with_grad: bool = False, group=None) -> Tensor:
    """Every rank's ``[m, ...]`` rows concatenated in rank order, ``[W·m, ...]`` (the same ``m`` on every
    rank). ``with_grad``: differentiable, as open_clip's ``gather_features(gather_with_grad=True)`` (backward
    sums each rank's gradient of its rows over the ranks); otherwise a constant (for a frozen model's
    rows)."""
    if with_grad:
        return torch.cat(differentiable.all_gather(tensor, group=group))
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.detach().contiguous(), group=group)
    return torch.cat(out)
