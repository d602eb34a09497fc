"""Joint example selection (JEST): chunked conditional sampling of a sub-batch from a super-batch; the
``joint`` selector (``selectors.SELECTORS``): ``joint_select`` on one process, ``distributed_joint_select`` on
a super-batch sharded over torch.distributed ranks.

Memory is O(B·D) plus one bounded ``[B, rows]`` logit tile (none with a fused backend); see
``contrastive.py`` and ``fused.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jestclip.selection.checks import check_count, check_gain, check_indices, full_precision
from jestclip.selection.embeddings import Embeddings
from jestclip.selection.fused import check_backend
from jestclip.selection.sampling import (
    CandidateGroups,
    DistributedExchange,
    Exchange,
    as_exchange,
    chunk_sizes,
    draw_chunks,
)
from jestclip.selection.scoring import (
    GATHER_BLOCK,
    ConditionalScores,
    ScoringInputs,
    resolve_inputs,
    warn_unusable,
)

__all__ = [
    "DEFAULT_GAIN",
    "JOINT",
    "JointSelector",
    "batch_score",
    "conditional_scores",
    "distributed_joint_select",
    "joint_select",
]

# Algorithm 2's `softmax_score_gain`: the inverse temperature of every sampling step.
DEFAULT_GAIN = 100.0


@full_precision
def conditional_scores(
    learner: Embeddings | None,
    reference: Embeddings | None,
    selected: Tensor,
    *,
    scoring: str = "learnability",
    loss: str = "sigmoid",
) -> Tensor:
    """``[B]`` conditional scores ``c_k(S)`` of every candidate given the chosen set ``selected`` (``[|S|]``).

    Sigmoid: ``c_k(S) = s_kk + sum_{i in S} (s_ik + s_ki)``. Softmax (Algorithm 3):
    ``c_k(S) = [-L_kk + (LSE_{j in S} L_kj + LSE_{j in S} L_jk) / 2]`` for the learner minus the same for
    the reference (learnability; ``easy_reference`` keeps minus the reference bracket, ``hard_learner``
    the learner bracket); the log-sum-exp terms vanish while S is empty. Entries of selected candidates and
    of candidates with non-finite embeddings are ``-inf``.
    """
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="conditional_scores")
    selected = check_indices(selected, inputs.n, inputs.device, "selected", "conditional_scores")
    unusable = selected[~inputs.usable[selected]]
    if unusable.numel():
        raise ValueError(
            f"conditional_scores: selected candidates {unusable[:8].tolist()} have non-finite embeddings "
            "(they would turn every score into nan)"
        )
    state = ConditionalScores(inputs, loss)
    state.absorb_indices(selected)
    scores = state.conditional()
    scores[selected] = float("-inf")
    return scores.masked_fill(~inputs.usable, float("-inf"))


@full_precision
def batch_score(
    learner: Embeddings | None,
    reference: Embeddings | None,
    indices: Tensor,
    *,
    scoring: str = "learnability",
    loss: str = "sigmoid",
) -> Tensor:
    """Joint score of the sub-batch S = ``indices`` (0-dim tensor).

    Sigmoid: ``s(S) = (1/|S|) sum_{i,j in S} s_ij``. Softmax: the eq. (1) batch loss of S under the
    scoring's signs (learner minus reference for learnability).
    """
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="batch_score")
    indices = check_indices(indices, inputs.n, inputs.device, "indices", "batch_score")
    if indices.numel() == 0:
        raise ValueError("batch_score: indices must name at least one candidate")
    sub = ScoringInputs(
        models=tuple((sign, emb.take(indices)) for sign, emb in inputs.models),
        n=indices.numel(),
        device=inputs.device,
        usable=inputs.usable[indices],
    )
    state = ConditionalScores(sub, loss)
    state.absorb_indices(torch.arange(indices.numel(), device=inputs.device))
    return state.in_context().mean()


def _absorb(state: ConditionalScores, exchange: Exchange, chunk: Tensor) -> None:
    """Add the chunk's pairs (global indices ``[c]``) to ``state``, their rows fetched a block at a time."""
    tensors = [x for _, emb in state.inputs.models for x in (emb.image, emb.text)]
    for start in range(0, chunk.numel(), GATHER_BLOCK):
        rows = exchange.rows(chunk[start : start + GATHER_BLOCK], tensors)
        state.absorb(list(zip(rows[0::2], rows[1::2], strict=True)))


@full_precision
def joint_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    n_chunks: int = 16,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = DEFAULT_GAIN,
    generator: torch.Generator | None = None,
    groups: CandidateGroups | tuple[Tensor, list[int]] | None = None,
    exchange: Exchange | None = None,
    backend: str | None = None,
) -> Tensor:
    """Jointly select ``size`` distinct candidates out of B; ``[size]`` long tensor in selection order.

    Chunk 1 is drawn without replacement with probability proportional to ``exp(gain * c_k(∅))``; chunk t
    from the remaining candidates with ``exp(gain * c_k(S_{t-1}))``. Chunk sizes sum to ``size`` and differ
    by at most one. With ``groups``, each chunk takes from each group its share of the group's quota while
    conditioning on the whole selected set. Deterministic for a given ``generator`` (on the embeddings'
    device). Candidates with non-finite embeddings are never selected (a ``NonFiniteCandidatesWarning``
    gives their count). ``exchange`` (instead of ``groups``): the embeddings are this holder's ``[n, D]``
    share of the candidates, and the result is global indices (see ``Exchange``). ``backend`` computes each
    chunk's update of the scores (``fused.BACKENDS``: ``torch`` tiles, or the fused Triton kernel with
    float32, TF32, bf16 or split-bf16 operands); None is ``fused.default_backend`` of the embeddings' device
    and the loss, ``torch`` on the CPU. Raises ValueError for a backend that cannot run there.
    """
    caller = "joint_select"
    inputs = resolve_inputs(learner, reference, scoring, loss, caller=caller)
    exchange = as_exchange(groups, exchange, caller)
    warn_unusable(inputs, caller)
    size = exchange.check(size, inputs.usable, generator, caller)
    n_chunks = check_count(n_chunks, "n_chunks", 1, size, "size", caller)
    gain = check_gain(gain, caller)
    state = ConditionalScores(inputs, loss, check_backend(backend, inputs.device, caller, loss))

    def next_logits(chunk: Tensor | None) -> Tensor:
        if chunk is not None:
            _absorb(state, exchange, chunk)
        return state.conditional() * gain

    return draw_chunks(
        next_logits,
        n=inputs.n,
        sizes=chunk_sizes(size, n_chunks),
        available=inputs.usable,
        generator=generator,
        exchange=exchange,
    )


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
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``joint_select`` of ``size`` of the ``W·B_local`` candidates sharded over the W ranks of the
    torch.distributed ``group`` (default: the world), through a ``DistributedExchange``.

    learner, reference: this rank's ``[B_local, D]`` embeddings (the same ``B_local`` on every rank).
    generator: seeded identically on every rank (a CPU generator is simplest). ``n_chunks`` is capped at
    ``size``; ``backend`` as in ``joint_select``. Returns ``(local, global_)``: this rank's ``[size / W]``
    picks as indices into its own candidates, and the whole ``[size]`` selection as global indices in
    selection order (the same on every rank), which equals ``joint_select`` on the concatenated candidates
    with one group per rank of quota ``size / W``.
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
        backend=backend,
    )
    n_local = (learner if learner is not None else reference).n
    return exchange.local(chosen, n_local), chosen


class JointSelector:
    """The ``joint`` selector (``selectors.Selector``); reads ``settings.n_chunks`` (capped at ``size``)."""

    name = "joint"
    settings = ("n_chunks",)

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
        """``[size / world_size]`` indices into this process's candidates: ``joint_select``'s selection on
        one process, this rank's picks of ``distributed_joint_select``'s under torch.distributed."""
        common = dict(size=size, scoring=scoring, loss=loss, gain=gain, generator=generator)
        if world_size > 1:
            return distributed_joint_select(learner, reference, n_chunks=settings.n_chunks, **common)[0]
        return joint_select(learner, reference, n_chunks=min(settings.n_chunks, size), **common)


JOINT = JointSelector()
