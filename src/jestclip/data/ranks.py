"""The processes a pool-wide job runs on (``torchrun``): which part of the shards is this process's, and the
few collectives such a job needs — sums of counts, gathered records, a barrier, and an error on one rank
raised on every rank (so that no rank waits forever in a collective the failed one never reaches).

One process (no process group initialised) is the world of one: every collective is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RankFailed", "Ranks"]

T = TypeVar("T")


class RankFailed(ValueError):
    """Another rank failed; its one-line message is this one's."""


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """torch.distributed's rank and world size when a process group is initialised, else (0, 1)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` by the fixed rule ``items[rank::world]`` (every rank computes every
        other's the same way)."""
        return list(items[self.rank :: self.world])

    def indices(self, n: int) -> range:
        """The positions of this rank's share of ``n`` items (``part``'s)."""
        return range(self.rank, n, self.world)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"

    def sum(self, counts: np.ndarray) -> np.ndarray:
        """``counts`` (int64) summed over the ranks, elementwise."""
        if self.world == 1:
            return counts
        tensor = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64)).to(self._device())
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def run(self, step: Callable[[], T]) -> T:
        """``step()`` on every rank; an exception on any rank is raised on every rank (this rank's own, or
        ``RankFailed`` carrying the failed rank's message), after every rank has finished the step."""
        try:
            result, failure = step(), None
        except Exception as exn:  # re-raised below, on every rank
            result, failure = None, exn
        if self.world == 1:
            if failure is not None:
                raise failure
            return result  # type: ignore[return-value]
        messages = self.gather(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        failed = next((m for m in messages if m is not None), None)
        if failed is not None:
            raise RankFailed(f"rank {messages.index(failed)}: {failed}")
        return result  # type: ignore[return-value]
