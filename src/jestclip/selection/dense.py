"""Dense reference implementation of JEST for small B: full ``[B, B]`` matrices, straight from the formulas.

This is the test oracle for the tiled engine and the source of learnability-matrix heat maps. It costs
O(B²) memory; do not use it on real super-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jestclip.selection.checks import full_precision
from jestclip.selection.embeddings import Embeddings
from jestclip.selection.joint import DEFAULT_GAIN
from jestclip.selection.sampling import CandidateGroups, chunk_sizes, draw_chunks
from jestclip.selection.scoring import resolve_inputs

__all__ = [
    "dense_batch_score",
    "dense_conditional_scores",
    "dense_joint_select",
    "logit_matrix",
    "pair_score_matrix",
    "sigmoid_loss_matrix",
]


def logit_matrix(emb: Embeddings, *, with_bias: bool) -> Tensor:
    """``[B, B]`` logits ``L_ij = scale * x_i . y_j (+ bias)`` in the embeddings' compute dtype."""
    dtype = emb.compute_dtype
    logits = emb.scale * (emb.image.to(dtype) @ emb.text.to(dtype).T)
    return logits + emb.bias if with_bias else logits


def sigmoid_loss_matrix(emb: Embeddings) -> Tensor:
    """``[B, B]`` sigmoid pair losses: ``softplus(-L_ii)`` on the diagonal, ``softplus(L_ij)`` off it."""
    logits = logit_matrix(emb, with_bias=True)
    eye = torch.eye(emb.n, dtype=torch.bool, device=emb.device)
    return torch.nn.functional.softplus(torch.where(eye, -logits, logits))


@full_precision
def pair_score_matrix(
    learner: Embeddings | None, reference: Embeddings | None, *, scoring: str = "learnability"
) -> Tensor:
    """``[B, B]`` sigmoid pair scores ``s_ij`` (e.g. ``l_ij - l*_ij`` for learnability)."""
    inputs = resolve_inputs(learner, reference, scoring, "sigmoid", caller="pair_score_matrix")
    return sum(sign * sigmoid_loss_matrix(emb).to(inputs.dtype) for sign, emb in inputs.models)


def _softmax_brackets(emb: Embeddings, rows: Tensor, members: Tensor) -> Tensor:
    """``[len(rows)]``: ``-L_kk + (LSE_{j in members} L_kj + LSE_{j in members} L_jk) / 2`` for k in rows."""
    logits = logit_matrix(emb, with_bias=False)
    diag = logits.diagonal()[rows]
    if members.numel() == 0:
        return -diag
    row_lse = torch.logsumexp(logits[rows][:, members], dim=1)
    col_lse = torch.logsumexp(logits[members][:, rows], dim=0)
    return -diag + 0.5 * (row_lse + col_lse)


@full_precision
def dense_conditional_scores(
    learner: Embeddings | None,
    reference: Embeddings | None,
    selected: Tensor,
    *,
    scoring: str = "learnability",
    loss: str = "sigmoid",
) -> Tensor:
    """Dense ``c_k(S)`` for all k; ``-inf`` for k in S or with non-finite embeddings.

    See ``conditional_scores``.
    """
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="dense_conditional_scores")
    selected = selected.long()
    everyone = torch.arange(inputs.n, device=inputs.device)
    if loss == "sigmoid":
        s = pair_score_matrix(learner, reference, scoring=scoring)
        scores = s.diagonal() + s[selected].sum(dim=0) + s[:, selected].sum(dim=1)
    else:
        scores = sum(
            sign * _softmax_brackets(emb, everyone, selected).to(inputs.dtype) for sign, emb in inputs.models
        )
    scores = scores.clone()
    scores[selected] = float("-inf")
    return scores.masked_fill(~inputs.usable, float("-inf"))


@full_precision
def dense_batch_score(
    learner: Embeddings | None,
    reference: Embeddings | None,
    indices: Tensor,
    *,
    scoring: str = "learnability",
    loss: str = "sigmoid",
) -> Tensor:
    """Dense joint score of the sub-batch ``indices``; see ``batch_score``."""
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="dense_batch_score")
    indices = indices.long()
    if loss == "sigmoid":
        s = pair_score_matrix(learner, reference, scoring=scoring)
        return s[indices][:, indices].sum() / indices.numel()
    return sum(
        sign * _softmax_brackets(emb, indices, indices).to(inputs.dtype).mean() for sign, emb in inputs.models
    )


@full_precision
def dense_joint_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    n_chunks: int = 16,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = DEFAULT_GAIN,
    generator: torch.Generator | None = None,
    groups: CandidateGroups | None = None,
) -> Tensor:
    """``joint_select`` with every conditional score recomputed densely from scratch (no validation)."""
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="dense_joint_select")
    chosen: list[Tensor] = []

    def next_logits(chunk: Tensor | None) -> Tensor:
        if chunk is not None:
            chosen.append(chunk)
        selected = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=inputs.device)
        scores = dense_conditional_scores(learner, reference, selected, scoring=scoring, loss=loss)
        return torch.where(torch.isfinite(scores), scores * gain, scores)

    return draw_chunks(
        next_logits,
        n=inputs.n,
        sizes=chunk_sizes(size, n_chunks),
        available=inputs.usable,
        generator=generator,
        groups=groups,
    )
