"""Running per-candidate contrastive terms of one model, updated one chunk of chosen pairs at a time.

For a candidate set C (``[B, D]`` embeddings) and a growing chosen set S, each class keeps ``[B]`` running
sums (sigmoid) or log-sum-exps (softmax) over S. Absorbing a chunk of ``c`` chosen pairs costs two
``[B, c]`` tiles (all candidate images vs chosen texts, chosen images vs all candidate texts), processed
in blocks of at most ``MAX_TILE_ELEMENTS``: no ``[B, B]`` tensor is ever built. With a ``triton-*``
backend (``fused.py``) the two reductions run in one kernel that stores no ``[B, c]`` tile at all.

Notation: ``L_ij = scale * x_i . y_j (+ bias for sigmoid)``, ``x`` image and ``y`` text embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from jestclip.selection.embeddings import Embeddings
from jestclip.selection.fused import backend_chunk_terms

__all__ = [
    "LOSSES",
    "MAX_TILE_ELEMENTS",
    "Loss",
    "RunningTerms",
    "SigmoidTerms",
    "SoftmaxTerms",
    "running_terms",
]

Loss = Literal["sigmoid", "softmax"]
LOSSES: tuple[str, ...] = ("sigmoid", "softmax")

# Upper bound on the elements of one [B, rows] logit tile (256 MiB in fp32).
MAX_TILE_ELEMENTS = 1 << 26


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, MAX_TILE_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


class RunningTerms:
    """One model's running conditional terms for a fixed candidate set (base class).

    ``backend`` (``fused.BACKENDS``, already checked) says how a chunk is absorbed: ``torch`` tiles or the
    fused kernel; the self terms are computed in torch either way.
    """

    def __init__(self, candidates: Embeddings, backend: str = "torch") -> None:
        self.candidates = candidates
        self.backend = backend
        self.dtype = candidates.compute_dtype
        self.n_absorbed = 0
        # L_kk without bias: scale * x_k . y_k, [B]
        self.self_similarity = (candidates.image.to(self.dtype) * candidates.text.to(self.dtype)).sum(
            dim=1
        ) * candidates.scale

    def _tiles(self, chunk_image: Tensor, chunk_text: Tensor) -> Iterator[tuple[str, Tensor]]:
        """Yield ("row", T) with T[k, i] = scale * x_k . y_i and ("col", T) with T[k, i] = scale * x_i . y_k.

        k ranges over all candidates, i over a block of the chunk; tiles are ``[B, rows]`` in ``self.dtype``
        (candidate-major: a skinny ``[B, D] x [D, rows]`` product is the faster orientation on CPU BLAS).
        """
        cand = self.candidates
        if chunk_image.shape != chunk_text.shape or chunk_image.shape[1:] != (cand.dim,):
            raise ValueError(
                f"chunk embeddings {tuple(chunk_image.shape)}/{tuple(chunk_text.shape)} do not match "
                f"candidates of dim {cand.dim}"
            )
        for name, chunk, other in (("row", chunk_text, cand.image), ("col", chunk_image, cand.text)):
            for block in _row_blocks(chunk.shape[0], cand.n):
                tile = torch.mm(other, chunk[block].to(other.dtype).T)
                tile = tile.to(self.dtype) if tile.dtype != self.dtype else tile
                yield name, tile.mul_(cand.scale)

    def _fused(self, chunk_image: Tensor, chunk_text: Tensor, loss: str) -> tuple[Tensor, Tensor]:
        """The chunk's ``(row, col)`` reductions from the fused backend, in ``self.dtype``."""
        cand = self.candidates
        row, col = backend_chunk_terms(
            self.backend, cand.image, cand.text, chunk_image, chunk_text, cand.scale, cand.bias, loss
        )
        return row.to(self.dtype), col.to(self.dtype)

    def absorb(self, chunk_image: Tensor, chunk_text: Tensor) -> None:
        """Add ``c`` chosen pairs (``[c, D]`` image and text embeddings of this model) to S."""
        raise NotImplementedError

    def conditional(self) -> Tensor:
        """``[B]``: the model's conditional loss bracket of each candidate k given S (k not in S)."""
        raise NotImplementedError

    def in_context(self) -> Tensor:
        """``[B]``: each candidate's own loss when S is its whole batch and contains it (eqs. 1-2)."""
        raise NotImplementedError


class SigmoidTerms(RunningTerms):
    """Sigmoid (SigLIP) pair losses ``l_kk = softplus(-L_kk)``, ``l_ik = softplus(L_ik)`` for i != k.

    ``conditional()`` is ``l_kk + sum_{i in S} (l_ik + l_ki)``: the increase of ``sum_{i,j} l_ij`` when k
    joins S.
    """

    def __init__(self, candidates: Embeddings, backend: str = "torch") -> None:
        super().__init__(candidates, backend)
        self.self_logit = self.self_similarity + candidates.bias
        self.self_loss = F.softplus(-self.self_logit)
        self.row = torch.zeros_like(self.self_loss)  # sum_{i in S} l_ki (image k vs chosen texts)
        self.col = torch.zeros_like(self.self_loss)  # sum_{i in S} l_ik (chosen images vs text k)

    def absorb(self, chunk_image: Tensor, chunk_text: Tensor) -> None:
        if self.backend != "torch":
            row, col = self._fused(chunk_image, chunk_text, "sigmoid")
            self.row += row
            self.col += col
            self.n_absorbed += chunk_image.shape[0]
            return
        bias = self.candidates.bias
        for name, tile in self._tiles(chunk_image, chunk_text):
            target = self.row if name == "row" else self.col
            target += F.softplus(tile.add_(bias)).sum(dim=1)
        self.n_absorbed += chunk_image.shape[0]

    def conditional(self) -> Tensor:
        return self.self_loss + self.row + self.col

    def in_context(self) -> Tensor:
        # eq. (2): l_kk + sum_{j != k} l_kj; `row` counted the j = k pair with the off-diagonal formula.
        return self.self_loss + self.row - F.softplus(self.self_logit)


class SoftmaxTerms(RunningTerms):
    """Softmax (CLIP) terms with ``L_ij = scale * x_i . y_j`` (bias ignored).

    ``conditional()`` is ``-L_kk + (LSE_{j in S} L_kj + LSE_{j in S} L_jk) / 2`` (Algorithm 3), and ``-L_kk``
    while S is empty.
    """

    def __init__(self, candidates: Embeddings, backend: str = "torch") -> None:
        super().__init__(candidates, backend)
        self.row_lse = torch.full_like(self.self_similarity, float("-inf"))  # LSE_{j in S} L_kj
        self.col_lse = torch.full_like(self.self_similarity, float("-inf"))  # LSE_{j in S} L_jk

    def absorb(self, chunk_image: Tensor, chunk_text: Tensor) -> None:
        if self.backend != "torch":
            row, col = self._fused(chunk_image, chunk_text, "softmax")
            self.row_lse = torch.logaddexp(self.row_lse, row)
            self.col_lse = torch.logaddexp(self.col_lse, col)
            self.n_absorbed += chunk_image.shape[0]
            return
        for name, tile in self._tiles(chunk_image, chunk_text):
            if name == "row":
                self.row_lse = torch.logaddexp(self.row_lse, torch.logsumexp(tile, dim=1))
            else:
                self.col_lse = torch.logaddexp(self.col_lse, torch.logsumexp(tile, dim=1))
        self.n_absorbed += chunk_image.shape[0]

    def conditional(self) -> Tensor:
        if self.n_absorbed == 0:
            return -self.self_similarity
        return -self.self_similarity + 0.5 * (self.row_lse + self.col_lse)

    def in_context(self) -> Tensor:
        # eq. (1): identical to the conditional bracket once S contains k.
        return self.conditional()


def running_terms(candidates: Embeddings, loss: str, backend: str = "torch") -> RunningTerms:
    """The running-terms object of ``loss`` ("sigmoid" or "softmax") over ``candidates``, absorbing chunks
    with ``backend`` (``fused.BACKENDS``; checked by the caller, see ``fused.check_backend``)."""
    if loss == "sigmoid":
        return SigmoidTerms(candidates, backend)
    if loss == "softmax":
        return SoftmaxTerms(candidates, backend)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
