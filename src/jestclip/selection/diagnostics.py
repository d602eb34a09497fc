"""Diagnostics for the paper's Figure 2: a brute-force Gibbs sampler over sub-batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from jestclip.selection.checks import check_gain, check_generator, check_indices, full_precision
from jestclip.selection.embeddings import Embeddings
from jestclip.selection.joint import DEFAULT_GAIN, batch_score
from jestclip.selection.scoring import resolve_inputs

__all__ = ["GibbsTrace", "gibbs_select"]


@dataclass(frozen=True)
class GibbsTrace:
    """Result of ``gibbs_select``.

    indices: ``[size]`` the final sub-batch; scores: ``[n_steps + 1]`` ``batch_score`` of the state before
    the first and after every step; accepted: how many proposed swaps were accepted.
    """

    indices: Tensor
    scores: Tensor
    accepted: int


@full_precision
def gibbs_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    n_steps: int,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = DEFAULT_GAIN,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
) -> GibbsTrace:
    """Metropolis swap sampler over sub-batches of ``size``, targeting ``p(S) ∝ exp(gain · |S| · s(S))``.

    ``|S| · s(S)`` is the summed pair score that the chunked sampler adds one conditional score at a time, so
    both samplers aim at the same distribution. Each step proposes swapping one member of S for one
    non-member (both uniform) and accepts with ``min(1, exp(gain · |S| · Δs))``, recomputing ``batch_score``
    from scratch (brute force: O(size² · D) a step). Starts from ``init`` or a uniform random subset.
    """
    caller = "gibbs_select"
    inputs = resolve_inputs(learner, reference, scoring, loss, caller=caller)
    if not 1 <= size < inputs.n:
        raise ValueError(f"{caller}: size must be in [1, B - 1 = {inputs.n - 1}], got {size}")
    if n_steps < 0:
        raise ValueError(f"{caller}: n_steps must be >= 0, got {n_steps}")
    gain = check_gain(gain, caller)
    check_generator(generator, inputs.device, caller)
    if not bool(inputs.usable.all()):
        raise ValueError(f"{caller}: all candidates must have finite embeddings")
    device = inputs.device
    if init is None:
        init = torch.randperm(inputs.n, generator=generator, device=device)[:size]
    current = check_indices(init, inputs.n, device, "init", caller).clone()
    if current.numel() != size:
        raise ValueError(f"{caller}: init has {current.numel()} indices but size is {size}")

    def score(indices: Tensor) -> float:
        return float(batch_score(learner, reference, indices, scoring=scoring, loss=loss))

    in_set = torch.zeros(inputs.n, dtype=torch.bool, device=device)
    in_set[current] = True
    current_score = score(current)
    scores, accepted = [current_score], 0
    for _ in range(n_steps):
        slot = int(torch.randint(size, (1,), generator=generator, device=device))
        outside = torch.nonzero(~in_set).flatten()
        newcomer = outside[int(torch.randint(outside.numel(), (1,), generator=generator, device=device))]
        u = float(torch.rand((), generator=generator, device=device))
        proposal = current.clone()
        proposal[slot] = newcomer
        proposal_score = score(proposal)
        if math.log(max(u, 1e-300)) < gain * size * (proposal_score - current_score):
            in_set[current[slot]] = False
            in_set[newcomer] = True
            current, current_score = proposal, proposal_score
            accepted += 1
        scores.append(current_score)
    return GibbsTrace(indices=current, scores=torch.tensor(scores, dtype=torch.float64), accepted=accepted)
