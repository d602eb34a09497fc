"""Selection over a super-batch sharded across data-parallel ranks, and data-parallel learning.

Rank r of W holds ``n`` candidates, global indices ``[r·n, (r+1)·n)``, and keeps the running conditional
sums of only those. ``DistributedExchange`` plugs this into the one chunked sampler
(``jestclip.selection.sampling.draw_chunks``). Each chunk:

1. every rank draws the same ``[W·n]`` Gumbel noise from the identically seeded generator and takes its slice;
2. each rank picks its quota for this chunk (``group_chunk_counts``) from its own candidates;
3. the picks' global indices and perturbed scores are all-gathered and ordered as the single-process sampler
   orders them; before the next chunk, their embeddings are all-gathered and absorbed by every rank.

So every rank ends with the same global selection — identical to ``joint_select`` with one group per rank
on the concatenated super-batch — and learns on exactly its ``b / W`` examples; no image moves between ranks,
only ``b`` embeddings per model.

Learning, as open_clip trains: each rank computes its share of the loss from its own ``b / W`` examples
(``steps.contrastive_loss``: neighbour exchange of text features for SigLIP, gathered features for CLIP; no
rank builds the ``b × b`` logits; ``steps.steered_learning_loss``: the learner's and the reference's rows
all-gathered by ``gather_rows``), and ``data_parallel`` wraps the step's one learning module in
``DistributedDataParallel``, which averages gradients bucket by bucket while backward still runs. The shares
are normalised so that their mean is the single-process batch loss: the averaged gradient is its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from jestclip.selection import DEFAULT_GAIN, Embeddings, group_chunk_counts, independent_select, joint_select
from jestclip.selection.checks import check_count
from jestclip.selection.sampling import gumbel_noise
from jestclip.train.forward import LearningForward

__all__ = [
    "DistributedExchange",
    "data_parallel",
    "distributed_independent_select",
    "distributed_joint_select",
    "gather_rows",
    "valued_at_rank_mean",
]


class DistributedExchange:
    """The ``Exchange`` of one rank of ``group``, holding ``n`` of the ``N = W·n`` candidates (see module)."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def _gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``[m, ...]`` tensor concatenated in rank order: ``[W·m, ...]``."""
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return torch.cat(out)

    def _counts(self, sizes: Sequence[int], t: int) -> list[int]:
        return group_chunk_counts([sum(sizes) // self.world] * self.world, sizes)[t]

    def check(self, size: object, usable: Tensor, generator: torch.Generator | None, caller: str) -> int:
        held = self._gather(torch.tensor([usable.numel(), int(usable.sum())], device=usable.device))
        n, n_usable = held[0::2].tolist(), held[1::2].tolist()
        if len(set(n)) != 1:
            raise ValueError(f"{caller}: every rank must hold the same number of candidates, got {n}")
        size = check_count(size, "size", 1, self.world * n[0], "B", caller)
        if size % self.world:
            raise ValueError(f"{caller}: size={size} must be divisible by the world size {self.world}")
        short = [r for r, u in enumerate(n_usable) if u < size // self.world]
        if short:
            raise ValueError(
                f"{caller}: rank(s) {short} hold fewer than {size // self.world} usable candidates"
            )
        return size

    def noise(
        self, n: int, *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        if not isinstance(generator, torch.Generator):
            raise ValueError("distributed sampling needs a torch.Generator seeded identically on every rank")
        draw = gumbel_noise(self.world * n, generator=generator, device=generator.device, dtype=dtype)
        return draw[self.rank * n : (self.rank + 1) * n].to(device)

    def pick(self, perturbed: Tensor, sizes: Sequence[int], t: int) -> Tensor:
        return torch.topk(perturbed, self._counts(sizes, t)[self.rank]).indices

    def share(self, picks: Tensor, perturbed: Tensor, sizes: Sequence[int], t: int) -> Tensor:
        pad = max(self._counts(sizes, t)) - picks.numel()  # all-gather needs equal shapes
        index = self._gather(torch.cat([picks + self.rank * perturbed.numel(), picks.new_full((pad,), -1)]))
        value = self._gather(torch.cat([perturbed[picks], perturbed.new_zeros(pad)]))
        real = index >= 0
        return index[real][torch.argsort(value[real], descending=True, stable=True)]

    def rows(self, chunk: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
        n = tensors[0].shape[0]
        owner = chunk // n
        per_rank = torch.bincount(owner, minlength=self.world)
        width = int(per_rank.max())
        mine = chunk[owner == self.rank] - self.rank * n
        real = (torch.arange(width, device=chunk.device) < per_rank[:, None]).flatten()
        back = torch.argsort(torch.argsort(owner, stable=True))  # gathered (rank-major) order -> chunk order
        return [
            self._gather(torch.cat([x[mine], x.new_zeros(width - mine.numel(), *x.shape[1:])]))[real][back]
            for x in tensors
        ]

    def local(self, indices: Tensor, n: int) -> Tensor:
        """This rank's entries of the global ``indices`` as indices into its ``n`` candidates, in order."""
        return indices[indices // n == self.rank] - self.rank * n


def distributed_joint_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    n_chunks: int = 16,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = DEFAULT_GAIN,
    generator: torch.Generator,
    group=None,
) -> tuple[Tensor, Tensor]:
    """Select ``size`` of the ``W·B_local`` candidates sharded over the ranks of ``group``.

    learner, reference: this rank's ``[B_local, D]`` embeddings (the same ``B_local`` on every rank).
    generator: seeded identically on every rank (a CPU generator is simplest). ``n_chunks`` is capped at
    ``size``. Returns ``(local, global_)``: this rank's ``[size / W]`` picks as indices into its own
    candidates, and the whole ``[size]`` selection as global indices in selection order (the same on every
    rank).
    """
    exchange = DistributedExchange(group)
    chosen = joint_select(
        learner,
        reference,
        size=size,
        n_chunks=min(n_chunks, size),
        scoring=scoring,
        loss=loss,
        gain=gain,
        generator=generator,
        exchange=exchange,
    )
    n_local = (learner if learner is not None else reference).n
    return exchange.local(chosen, n_local), chosen


def distributed_independent_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    method: str = "sample",
    gain: float = DEFAULT_GAIN,
    generator: torch.Generator,
    group=None,
) -> Tensor:
    """Independent prioritisation on a sharded super-batch: each rank takes its ``size / W`` best candidates
    by unconditional score (perturbed by its slice of the shared Gumbel draw when ``method="sample"``).

    Returns this rank's ``[size / W]`` picks as indices into its own ``[B_local]`` candidates. Only the
    unconditional context is supported: a per-example loss against the whole super-batch would need every
    rank's embeddings.
    """
    return independent_select(
        learner,
        reference,
        size=size,
        scoring=scoring,
        loss=loss,
        context="unconditional",
        method=method,
        gain=gain,
        generator=generator,
        exchange=DistributedExchange(group),
    )


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
