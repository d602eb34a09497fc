"""The paper's baseline: independent prioritisation, each example scored on its own."""

from __future__ import annotations

import torch
from torch import Tensor

from jestclip.selection.checks import check_gain, full_precision
from jestclip.selection.embeddings import Embeddings
from jestclip.selection.joint import DEFAULT_GAIN
from jestclip.selection.sampling import Exchange, LocalExchange
from jestclip.selection.scoring import ConditionalScores, resolve_inputs, warn_unusable

__all__ = ["CONTEXTS", "METHODS", "independent_scores", "independent_select"]

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
