"""The selectors: how a selecting method picks b of the B candidates, one registry entry each.

A selector is one module of ``selection/`` holding its local form (every candidate in this process), its
distributed form (this rank's shard of a super-batch sharded over torch.distributed ranks, through
``sampling.DistributedExchange``) and a ``Selector`` that runs one or the other with its settings:
``joint.JOINT`` (JEST's chunked joint sampling) and ``independent.INDEPENDENT`` (independent
prioritisation). A training method names one by its key in ``SELECTORS`` (``train.methods.Method.selector``).

A selector's settings are fields of a method's settings, ``train.settings.MethodConfig`` (flat, as in a run's
``config.json``: ``method.n_chunks``, ``method.independent_context``, ``method.independent_method``), checked
there (``train.validation.CHECKS``); ``Selector.settings`` names the ones it reads from the ``settings``
object its ``select`` is given.

Adding a selector: its module here (local and distributed forms and a ``Selector``), its line in
``SELECTORS``, a ``Method`` that names it (``train/methods.py``), and in ``MethodConfig`` any settings field
it reads that is not there yet.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from jestclip.selection.embeddings import Embeddings
from jestclip.selection.independent import INDEPENDENT
from jestclip.selection.joint import JOINT

__all__ = ["SELECTORS", "Selector", "get_selector"]


class Selector(Protocol):
    """One way to select: its ``SELECTORS`` key, the settings fields it reads, and ``select``."""

    name: str
    settings: tuple[str, ...]  # the fields of ``settings`` that ``select`` reads (``MethodConfig`` fields)

    def select(
        self,
        learner: Embeddings | None,
        reference: Embeddings | None,
        settings: Any,
        *,
        size: int,
        scoring: str,
        loss: str,
        gain: float,
        generator: torch.Generator | None,
        world_size: int = 1,
    ) -> Tensor:
        """Select ``size`` of the candidates whose ``[B_local, D]`` embeddings are given; ``[size / W]``
        indices into them (in selection order on one process). ``world_size`` 1: the local form, every
        candidate here; > 1: the distributed form (torch.distributed initialised; this rank's shard, the same
        ``B_local`` on every rank, ``generator`` seeded identically on every rank). Raises ValueError as the
        form it runs does."""
        ...


SELECTORS: dict[str, Selector] = {s.name: s for s in (JOINT, INDEPENDENT)}


def get_selector(name: str) -> Selector:
    """The selector ``name``; a ValueError lists the known ones."""
    if name not in SELECTORS:
        raise ValueError(f"selector must be one of {tuple(SELECTORS)}, got {name!r}")
    return SELECTORS[name]
