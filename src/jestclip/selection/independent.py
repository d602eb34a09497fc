"""The paper's baseline: independent prioritisation, each example scored on its own; the ``independent``
selector (``selectors.SELECTORS``): ``independent_select`` on one process, ``distributed_independent_select``
on a super-batch sharded over torch.distributed ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jestclip.selection.checks import check_gain, full_precision
from jestclip.selection.embeddings import Embeddings
from jestclip.selection.joint import DEFAULT_GAIN
from jestclip.selection.sampling import DistributedExchange, Exchange, LocalExchange
from jestclip.selection.scoring import ConditionalScores, resolve_inputs, warn_unusable

__all__ = [
    "CONTEXTS",
    "INDEPENDENT",
    "METHODS",
    "IndependentSelector",
    "distributed_independent_select",
    "independent_scores",
    "independent_select",
]

CONTEXTS: tuple[str, ...] = ("unconditional", "superbatch")
METHODS: tuple[str, ...] = ("sample", "topk")


@full_precision
def independent_scores(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    context: str = "unconditional",
) -> Tensor:
    """``[B]`` per-example scores; ``-inf`` for candidates with non-finite embeddings.

    context="unconditional": ``c_k(∅)`` (the example's positive-pair term alone).
    context="superbatch": the example's loss with the whole (usable) super-batch as negatives, eq. (2)
    for sigmoid (``l_kk + sum_{j != k} l_kj``), eq. (1) for softmax, combined by the scoring's signs.
    """
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="independent_scores")
    if context not in CONTEXTS:
        raise ValueError(f"independent_scores: context must be one of {CONTEXTS}, got {context!r}")
    state = ConditionalScores(inputs, loss)
    if context == "unconditional":
        scores = state.conditional()
    else:
        state.absorb_indices(torch.nonzero(inputs.usable).flatten())
        scores = state.in_context()
    return scores.masked_fill(~inputs.usable, float("-inf"))


@full_precision
def independent_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    context: str = "unconditional",
    method: str = "sample",
    gain: float = DEFAULT_GAIN,
    generator: torch.Generator | None = None,
    exchange: Exchange | None = None,
) -> Tensor:
    """Select ``size`` distinct candidates by per-example score; ``[size]``, highest (perturbed) first.

    method="sample" draws without replacement with probability proportional to ``exp(gain * score)``
    (Gumbel-top-k); method="topk" takes the ``size`` best scores. ``exchange`` (default ``LocalExchange()``):
    the embeddings are this holder's share, the result its picks as local indices, and ``size`` counts all
    holders' picks; ``context="superbatch"`` would then see only this holder's candidates.
    """
    caller = "independent_select"
    if method not in METHODS:
        raise ValueError(f"{caller}: method must be one of {METHODS}, got {method!r}")
    inputs = resolve_inputs(learner, reference, scoring, loss, caller=caller)
    exchange = LocalExchange() if exchange is None else exchange
    warn_unusable(inputs, caller)
    size = exchange.check(size, inputs.usable, generator, caller)
    gain = check_gain(gain, caller)
    scores = independent_scores(learner, reference, scoring=scoring, loss=loss, context=context)
    if method == "sample":
        noise = exchange.noise(inputs.n, generator=generator, device=scores.device, dtype=scores.dtype)
        # mask after scaling: gain = 0 would turn -inf into nan
        scores = torch.where(inputs.usable, scores * gain + noise, float("-inf"))
    return exchange.pick(scores, [size], 0)


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
    """Independent prioritisation on a super-batch sharded over the W ranks of the torch.distributed
    ``group`` (default: the world): each rank takes its ``size / W`` best candidates by unconditional score
    (perturbed by its slice of the shared Gumbel draw when ``method="sample"``; ``generator`` seeded
    identically on every rank).

    Returns this rank's ``[size / W]`` picks as indices into its own ``[B_local]`` candidates. Only the
    unconditional context: a per-example loss against the whole super-batch would need every rank's
    embeddings.
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


class IndependentSelector:
    """The ``independent`` selector (``selectors.Selector``); reads ``settings.independent_context``
    (``CONTEXTS``) and ``settings.independent_method`` (``METHODS``)."""

    name = "independent"
    settings = ("independent_context", "independent_method")

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
        """``[size / world_size]`` indices into this process's candidates: ``independent_select`` on one
        process, ``distributed_independent_select`` under torch.distributed (a ValueError unless
        ``independent_context`` is ``"unconditional"``)."""
        common = dict(size=size, scoring=scoring, loss=loss, gain=gain, generator=generator)
        method = settings.independent_method
        if world_size > 1:
            if settings.independent_context != "unconditional":
                raise ValueError(
                    "distributed independent selection needs independent_context='unconditional'"
                )
            return distributed_independent_select(learner, reference, method=method, **common)
        context = settings.independent_context
        return independent_select(learner, reference, context=context, method=method, **common)


INDEPENDENT = IndependentSelector()
