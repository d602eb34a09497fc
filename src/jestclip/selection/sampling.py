"""Sampling without replacement in log space, exact chunk sizes and per-group quotas.

Drawing ``n`` items without replacement with probability proportional to ``exp(logit_k)`` (successive
sampling, i.e. Plackett-Luce) is the top-``n`` of ``logit_k + Gumbel noise``: no exponentials, so no
overflow, and never a duplicate.

``draw_chunks`` is the one chunked sampler. Where the candidates live is an ``Exchange``: ``LocalExchange``
holds all of them in this process; ``DistributedExchange`` holds one torch.distributed rank's shard and
all-gathers each chunk's picks and rows (a data-parallel trainer's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from jestclip.selection.checks import check_count, check_generator

__all__ = [
    "CandidateGroups",
    "DistributedExchange",
    "Exchange",
    "LocalExchange",
    "as_exchange",
    "chunk_sizes",
    "draw_chunks",
    "group_chunk_counts",
    "gumbel_noise",
    "top_k_per_group",
]


def chunk_sizes(size: int, n_chunks: int) -> list[int]:
    """Split ``size`` into ``n_chunks`` integers that sum to ``size`` and differ by at most one.

    The larger chunks come first: ``chunk_sizes(10, 4) == [3, 3, 2, 2]``.
    """
    if n_chunks < 1 or n_chunks > size:
        raise ValueError(f"n_chunks must be in [1, size={size}], got {n_chunks}")
    base, extra = divmod(size, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


@dataclass(frozen=True)
class CandidateGroups:
    """A group id per candidate and how many candidates to select from each group.

    ids: ``[B]`` integer tensor with values in ``[0, G)``; quotas: G non-negative ints summing to the
    selection size. A data-parallel trainer passes one group per rank (the candidates it holds).
    """

    ids: Tensor
    quotas: tuple[int, ...]

    def __init__(self, ids: Tensor, quotas: Sequence[int] | Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError("groups.ids must be a 1-D integer tensor with one group id per candidate")
        quotas = tuple(int(q) for q in (quotas.tolist() if isinstance(quotas, Tensor) else quotas))
        if not quotas:
            raise ValueError("groups.quotas must name at least one group")
        if min(quotas) < 0:
            raise ValueError(f"groups.quotas must be non-negative, got {list(quotas)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(quotas)):
            raise ValueError(
                f"groups.ids must lie in [0, {len(quotas)}) (one quota per group), "
                f"got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        object.__setattr__(self, "ids", ids.long())
        object.__setattr__(self, "quotas", quotas)

    def validate(self, n: int, size: int, usable: Tensor) -> None:
        """Check against B = ``n`` candidates, the selection ``size`` and the ``[B]`` usable mask."""
        if self.ids.shape[0] != n:
            raise ValueError(f"groups.ids has {self.ids.shape[0]} entries but there are {n} candidates")
        if sum(self.quotas) != size:
            raise ValueError(f"groups.quotas sum to {sum(self.quotas)} but size is {size}")
        if self.ids.device != usable.device:
            raise ValueError(f"groups.ids is on {self.ids.device} but the embeddings are on {usable.device}")
        available = torch.bincount(self.ids[usable], minlength=len(self.quotas)).tolist()
        short = [(g, q, a) for g, (q, a) in enumerate(zip(self.quotas, available, strict=True)) if q > a]
        if short:
            g, q, a = short[0]
            raise ValueError(
                f"group {g} has quota {q} but only {a} usable candidates ({len(short)} group(s) short)"
            )


def group_chunk_counts(quotas: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """How many of each group to draw in each chunk: ``[n_chunks][G]``.

    Rows sum to ``sizes``, columns to ``quotas``. Seats are dealt one at a time to the group furthest below
    its proportional share ``quota_g * seats_dealt / total`` (ties to the lower id), so after every chunk
    each group has drawn about its share (within one or two seats); equal quotas give round-robin chunks.
    """
    quotas, sizes = tuple(int(q) for q in quotas), tuple(int(s) for s in sizes)
    if sum(quotas) != sum(sizes):
        raise ValueError(f"quotas sum to {sum(quotas)} but chunk sizes sum to {sum(sizes)}")
    return [list(row) for row in _deal_seats(quotas, sizes)]


@functools.lru_cache(maxsize=64)
def _deal_seats(quotas: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    target = np.asarray(quotas, dtype=np.float64) / max(1, sum(quotas))
    dealt = np.zeros(len(quotas), dtype=np.int64)
    full = np.asarray(quotas) == 0
    rows, seat = [], 0
    for size in sizes:
        before = dealt.copy()
        for _ in range(size):
            seat += 1
            deficit = np.where(full, -np.inf, target * seat - dealt)
            g = int(np.argmax(deficit))
            dealt[g] += 1
            full[g] = dealt[g] >= quotas[g]
        rows.append(tuple((dealt - before).tolist()))
    return tuple(rows)


def gumbel_noise(
    n: int, *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``[n]`` i.i.d. standard Gumbel samples, ``-log(-log(U))`` with U uniform in (0, 1)."""
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp_(min=tiny, max=1.0 - torch.finfo(dtype).eps)))


def top_k_per_group(perturbed: Tensor, counts: Sequence[int] | None, ids: Tensor | None, k: int) -> Tensor:
    """Indices of the ``k`` largest ``perturbed`` values (``[B]``), ``counts[g]`` of them from group g.

    Returned in descending order of ``perturbed`` (the order successive sampling would draw them in).
    """
    if ids is None or counts is None:
        return torch.topk(perturbed, k).indices
    # Sort descending, then stably by group: each group's candidates become a run in descending order.
    by_value = torch.argsort(perturbed, descending=True, stable=True)
    order = by_value[torch.argsort(ids[by_value], stable=True)]
    group_sizes = torch.bincount(ids, minlength=len(counts))
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    sorted_ids = ids[order]
    rank_in_group = torch.arange(order.numel(), device=order.device) - starts[sorted_ids]
    quota = torch.as_tensor(counts, device=order.device)[sorted_ids]
    chosen = order[rank_in_group < quota]
    return chosen[torch.argsort(perturbed[chosen], descending=True, stable=True)]


class Exchange(Protocol):
    """How the holder of ``n`` of all N candidates takes part in a draw (see ``draw_chunks``).

    Local indices point into the holder's ``n`` candidates, global ones into all N. Every holder calls every
    method in the same order with the same ``sizes`` and ``t``, so an implementation may communicate.
    """

    def check(self, size: object, usable: Tensor, generator: torch.Generator | None, caller: str) -> int:
        """``size`` as an int, after checking it can be drawn from all holders' candidates.

        usable: this holder's ``[n]`` bool mask. Raises a ValueError naming ``caller`` otherwise.
        """
        ...

    def noise(
        self, n: int, *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """``[n]``: this holder's slice of one ``[N]`` standard Gumbel draw from ``generator``."""
        ...

    def pick(self, perturbed: Tensor, sizes: Sequence[int], t: int) -> Tensor:
        """Local indices this holder draws in chunk ``t`` of ``sizes``, by descending ``perturbed``."""
        ...

    def share(self, picks: Tensor, perturbed: Tensor, sizes: Sequence[int], t: int) -> Tensor:
        """``[sizes[t]]``: all holders' ``picks`` of chunk t, global, by descending perturbed score."""
        ...

    def rows(self, chunk: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
        """For each per-candidate ``[n, ...]`` tensor, its ``[c, ...]`` rows at the global ``chunk``."""
        ...


class LocalExchange:
    """All N = n candidates in this process: nothing is communicated. ``groups`` sets per-group quotas."""

    def __init__(self, groups: CandidateGroups | tuple[Tensor, Sequence[int]] | None = None) -> None:
        if groups is not None and not isinstance(groups, CandidateGroups):
            groups = CandidateGroups(*groups)
        self.groups = groups

    def check(self, size: object, usable: Tensor, generator: torch.Generator | None, caller: str) -> int:
        n = usable.numel()
        size = check_count(size, "size", 1, n, "B", caller)
        check_generator(generator, usable.device, caller)
        n_usable = int(usable.sum())
        if n_usable < size:
            raise ValueError(f"{caller}: size={size} but only {n_usable} of {n} candidates are usable")
        if self.groups is not None:
            self.groups.validate(n, size, usable)
        return size

    def noise(
        self, n: int, *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        return gumbel_noise(n, generator=generator, device=device, dtype=dtype)

    def pick(self, perturbed: Tensor, sizes: Sequence[int], t: int) -> Tensor:
        if self.groups is None:
            return top_k_per_group(perturbed, None, None, sizes[t])
        counts = group_chunk_counts(self.groups.quotas, sizes)[t]
        return top_k_per_group(perturbed, counts, self.groups.ids, sizes[t])

    def share(self, picks: Tensor, perturbed: Tensor, sizes: Sequence[int], t: int) -> Tensor:
        return picks

    def rows(self, chunk: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [x[chunk] for x in tensors]


class DistributedExchange:
    """The ``Exchange`` of rank r of a torch.distributed ``group`` of W ranks (default: the world), holding
    ``n`` candidates, global indices ``[r·n, (r+1)·n)`` (the same ``n`` on every rank). In each chunk:

    1. every rank draws the same ``[W·n]`` Gumbel noise from the identically seeded generator and takes its
       slice;
    2. each rank picks its quota for this chunk (``group_chunk_counts``) from its own candidates;
    3. the picks' global indices and perturbed scores are all-gathered and ordered as ``LocalExchange``
       orders them; before the next chunk, their rows are all-gathered and absorbed by every rank.

    So every rank ends with the same global selection — identical to ``LocalExchange`` with one group per
    rank on the concatenated candidates — and no image moves between ranks, only the chosen rows.
    """

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


def as_exchange(
    groups: CandidateGroups | tuple[Tensor, Sequence[int]] | None, exchange: Exchange | None, caller: str
) -> Exchange:
    """``exchange``, or ``LocalExchange(groups)`` when it is None (groups belong to the exchange)."""
    if exchange is None:
        return LocalExchange(groups)
    if groups is not None:
        raise ValueError(f"{caller}: pass groups or exchange, not both (give the exchange the groups)")
    return exchange


def draw_chunks(
    next_logits: Callable[[Tensor | None], Tensor],
    *,
    n: int,
    sizes: Sequence[int],
    available: Tensor,
    generator: torch.Generator | None,
    groups: CandidateGroups | None = None,
    exchange: Exchange | None = None,
) -> Tensor:
    """Successive chunked sampling without replacement; ``[sum(sizes)]`` global indices in selection order.

    ``next_logits(chunk)`` is told the chunk just drawn (None before the first) and returns the ``[n]``
    sampling logits of this holder's candidates for the next chunk; candidates that are drawn or not
    ``available`` (``[n]`` bool) are never drawn. Each chunk uses one Gumbel draw from ``generator``, so any
    implementation of ``next_logits`` that returns the same logits draws the same indices. ``exchange``
    (default ``LocalExchange(groups)``) says which candidates this holder draws and how the chunk is shared.
    """
    exchange = as_exchange(groups, exchange, "draw_chunks")
    available = available.clone()
    picks: list[Tensor] = []
    chunk: Tensor | None = None
    for t in range(len(sizes)):
        logits = next_logits(chunk).masked_fill(~available, float("-inf"))
        perturbed = logits + exchange.noise(n, generator=generator, device=logits.device, dtype=logits.dtype)
        mine = exchange.pick(perturbed, sizes, t)
        available[mine] = False
        chunk = exchange.share(mine, perturbed, sizes, t)
        picks.append(chunk)
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=available.device)
