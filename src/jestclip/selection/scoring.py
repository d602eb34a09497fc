"""Scoring rules and the running conditional scores of a candidate super-batch.

A scoring rule weighs the learner's and the reference's loss terms:

==================  ========  ==========
scoring             learner   reference
==================  ========  ==========
``learnability``    +1        -1
``easy_reference``  0         -1
``hard_learner``    +1        0
==================  ========  ==========

so for the sigmoid loss the pair score is ``s_ij = l_ij - l*_ij``, ``-l*_ij`` or ``l_ij``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from jestclip.selection.contrastive import LOSSES, RunningTerms, running_terms
from jestclip.selection.embeddings import Embeddings, usable_rows
from jestclip.selection.fused import check_backend

__all__ = [
    "SCORINGS",
    "ConditionalScores",
    "NonFiniteCandidatesWarning",
    "Scoring",
    "ScoringInputs",
    "resolve_inputs",
    "scoring_uses",
    "warn_unusable",
]

Scoring = Literal["learnability", "easy_reference", "hard_learner"]
SCORINGS: tuple[str, ...] = ("learnability", "easy_reference", "hard_learner")
_SIGNS: dict[str, tuple[float, float]] = {
    "learnability": (1.0, -1.0),
    "easy_reference": (0.0, -1.0),
    "hard_learner": (1.0, 0.0),
}


def scoring_uses(scoring: str) -> tuple[bool, bool]:
    """``(learner, reference)``: whether ``scoring`` needs the learner's and the reference's embeddings."""
    if scoring not in _SIGNS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    learner_sign, reference_sign = _SIGNS[scoring]
    return learner_sign != 0.0, reference_sign != 0.0


# Rows gathered at a time by `absorb_indices` (bounds the copy of chosen embeddings).
GATHER_BLOCK = 8192


class NonFiniteCandidatesWarning(RuntimeWarning):
    """Some candidates had non-finite embeddings and were excluded from selection."""


@dataclass(frozen=True)
class ScoringInputs:
    """Validated inputs: the models a scoring rule uses, with their signs, and which candidates are usable."""

    models: tuple[tuple[float, Embeddings], ...]  # (sign, embeddings), only models with a non-zero sign
    n: int  # number of candidates B
    device: torch.device
    usable: Tensor  # [B] bool: finite embeddings in every model used

    @property
    def dtype(self) -> torch.dtype:
        dtype = torch.float32
        for _, emb in self.models:
            dtype = torch.promote_types(dtype, emb.compute_dtype)
        return dtype


def resolve_inputs(
    learner: Embeddings | None, reference: Embeddings | None, scoring: str, loss: str, *, caller: str
) -> ScoringInputs:
    """Check the arguments common to all selection functions and pick the models ``scoring`` needs."""
    if scoring not in _SIGNS:
        raise ValueError(f"{caller}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if loss not in LOSSES:
        raise ValueError(f"{caller}: loss must be one of {LOSSES}, got {loss!r}")
    learner_sign, reference_sign = _SIGNS[scoring]
    models: list[tuple[float, Embeddings]] = []
    for name, emb, sign in (("learner", learner, learner_sign), ("reference", reference, reference_sign)):
        if emb is not None and not isinstance(emb, Embeddings):
            raise ValueError(f"{caller}: {name} must be an Embeddings or None, got {type(emb).__name__}")
        if sign == 0.0:
            continue
        if emb is None:
            raise ValueError(f"{caller}: scoring={scoring!r} needs {name} embeddings, but {name} is None")
        models.append((sign, emb))
    present = [(name, e) for name, e in (("learner", learner), ("reference", reference)) if e is not None]
    (first_name, first), *rest = present
    for name, emb in rest:
        if emb.n != first.n:
            raise ValueError(
                f"{caller}: {name} has {emb.n} candidates but {first_name} has {first.n}; "
                "both must embed the same super-batch"
            )
        if emb.device != first.device:
            raise ValueError(f"{caller}: {name} is on {emb.device} but {first_name} is on {first.device}")
    usable = torch.ones(first.n, dtype=torch.bool, device=first.device)
    for _, emb in models:
        usable &= usable_rows(emb)
    return ScoringInputs(models=tuple(models), n=first.n, device=first.device, usable=usable)


def warn_unusable(inputs: ScoringInputs, caller: str) -> int:
    """Warn about candidates with non-finite embeddings; return how many there are."""
    n_bad = int((~inputs.usable).sum())
    if n_bad:
        first = torch.nonzero(~inputs.usable).flatten()[:8].tolist()
        warnings.warn(
            f"{caller}: {n_bad} of {inputs.n} candidates have non-finite embeddings and are never selected "
            f"(first indices: {first})",
            NonFiniteCandidatesWarning,
            stacklevel=3,
        )
    return n_bad


class ConditionalScores:
    """Running conditional scores ``c_k(S)`` of B candidates as chosen pairs are absorbed into S.

    The candidates may be a shard of a larger super-batch: ``absorb`` takes the chosen pairs' embeddings
    wherever they came from (e.g. all-gathered across ranks), so each rank can keep the sums of the
    candidates it holds. Memory is O(B) plus one ``[B, rows]`` tile (none with a ``triton-*`` backend).
    ``backend``: how chunks are absorbed (``fused.BACKENDS``; None: ``fused.default_backend`` of the device
    and loss).
    """

    def __init__(self, inputs: ScoringInputs, loss: str, backend: str | None = None) -> None:
        self.inputs = inputs
        self.backend = check_backend(backend, inputs.device, "ConditionalScores", loss)
        self.terms: list[tuple[float, RunningTerms]] = [
            (sign, running_terms(emb, loss, self.backend)) for sign, emb in inputs.models
        ]

    @classmethod
    def from_embeddings(
        cls,
        learner: Embeddings | None,
        reference: Embeddings | None,
        *,
        scoring: str,
        loss: str,
        backend: str | None = None,
    ) -> ConditionalScores:
        """Validate the inputs like ``joint_select`` does and start with S empty."""
        inputs = resolve_inputs(learner, reference, scoring, loss, caller="ConditionalScores")
        return cls(inputs, loss, backend)

    @property
    def n_absorbed(self) -> int:
        return self.terms[0][1].n_absorbed

    def absorb(self, chunks: list[tuple[Tensor, Tensor]]) -> None:
        """Add chosen pairs to S.

        chunks: one ``(image [c, D_m], text [c, D_m])`` per model, in ``inputs.models`` order.
        """
        if len(chunks) != len(self.terms):
            raise ValueError(f"absorb expects {len(self.terms)} (image, text) chunks, got {len(chunks)}")
        for (_, terms), (image, text) in zip(self.terms, chunks, strict=True):
            terms.absorb(image, text)

    def absorb_indices(self, indices: Tensor) -> None:
        """Add the candidates ``indices`` (``[c]``) of this set to S (gathered a block at a time)."""
        for start in range(0, indices.numel(), GATHER_BLOCK):
            block = indices[start : start + GATHER_BLOCK]
            self.absorb([(emb.image[block], emb.text[block]) for _, emb in self.inputs.models])

    def _combine(self, parts: list[Tensor]) -> Tensor:
        out = torch.zeros(self.inputs.n, dtype=self.inputs.dtype, device=self.inputs.device)
        for (sign, _), part in zip(self.terms, parts, strict=True):
            out += sign * part.to(out.dtype)
        return out

    def conditional(self) -> Tensor:
        """``[B]`` conditional scores ``c_k(S)``; meaningless for k already in S (callers mask them)."""
        return self._combine([terms.conditional() for _, terms in self.terms])

    def in_context(self) -> Tensor:
        """``[B]`` per-example scores when S (containing each k) is the whole batch: eqs. (1)-(2)."""
        return self._combine([terms.in_context() for _, terms in self.terms])
