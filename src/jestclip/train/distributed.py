"""Selection over a super-batch sharded across data-parallel ranks, and data-parallel gradients.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from jestclip.selection import DEFAULT_GAIN, Embeddings, group_chunk_counts, independent_select, joint_select
from jestclip.selection.checks import check_count
from jestclip.selection.sampling import gumbel_noise

__all__ = [
    "DistributedExchange",
    "all_gather_with_grad",
    "average_gradients",
    "distributed_independent_select",
    "distributed_joint_select",
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


def all_gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``[n, ...]`` tensor in rank order; gradients flow back to each owner."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous(), group=group))


def average_gradients(parameters, group=None) -> None:
    """Average the gradients of ``parameters`` over the ranks with one all-reduce of a flat buffer."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
