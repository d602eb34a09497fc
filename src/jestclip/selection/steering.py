"""A contrastive loss steered by a reference model (DRRho-style): the learner learns on its logits minus
the reference's.

Source: Wei et al. 2025, "Model Steering: Learning with a Reference Model Improves Generalization Bounds and
Scaling Laws", arXiv 2505.06699 (DRRho risk minimisation); its code, Optimization-AI/DRRho-CLIP,
``src/fast_clip/loss.py``, ``FastCLIPLoss.pairwise_loss``, subtracts the reference's pairwise similarity
differences, scaled by the *learner's* logit scale, from the learner's.

Notation as in ``contrastive.py``: ``x_i``, ``y_j`` the learner's L2-normalised image and text features,
``s`` its logit scale ``exp(log_scale)`` and ``β`` its bias; ``x'_i``, ``y'_j`` the reference's. The steered
logit of pair (i, j) is

    D_ij = s · (x_i · y_j − x'_i · y'_j)  (+ β for sigmoid)

a logit: the difference of the two models' cosine similarities, scaled by the learner's ``s``. The
reference's own scale and bias (``Embeddings.scale`` / ``.bias``) are not used, and the learner's bias
enters once. The losses are those of open_clip on ``D`` in place of the
learner's logits, in nats:

- softmax (CLIP): ``(1 / 2b) Σ_i [(−D_ii + LSE_j D_ij) + (−D_ii + LSE_j D_ji)]``;
- sigmoid (SigLIP): ``(1 / b) Σ_i Σ_j softplus(−z_ij D_ij)``, ``z_ij = 1`` if ``i = j`` else ``−1``.

With the reference equal to the learner the steering cancels: ``D_ij = 0`` (softmax, the loss is ``log b``)
or ``β`` (sigmoid, the loss is ``softplus(−β) + (b − 1) softplus(β)``). The reference is frozen: its features
are detached, so it gets no gradient; ``s`` (and ``β``) get the gradient of ``D`` in them. See
docs/selection.md for what differs from DRRho-CLIP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from jestclip.selection.contrastive import LOSSES
from jestclip.selection.embeddings import Embeddings

__all__ = ["steered_loss"]


def steered_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    reference: Embeddings,
    loss: str,
    *,
    batch: tuple[Tensor, Tensor, Embeddings] | None = None,
    offset: int = 0,
) -> Tensor:
    """The reference-steered contrastive loss of ``n`` pairs (see the module for the formulas): a scalar.

    image, text: the learner's L2-normalised ``[n, D]`` features; scale, bias: its logit scale (the
    multiplier ``exp(log_scale)``) and bias, scalar tensors (bias unused by softmax). reference: the
    reference's ``[n, D]`` embeddings of the same pairs; only its features are used. loss: "sigmoid" or
    "softmax".

    batch: for a share of a larger batch (one data-parallel rank's): the whole batch's ``(image [b, D],
    text [b, D], reference)``, of which the ``n`` rows above are rows ``[offset, offset + n)``. The result is
    then the loss of those rows against the whole batch (their images' and, for softmax, their texts'
    terms) normalised by ``n``: the mean of the shares over a partition of the batch into equal parts is
    the loss of the whole batch. None: the rows are the whole batch.

    A ValueError names a shape (or row count) that does not match, or an unknown loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    all_image, all_text, all_reference = batch if batch is not None else (image, text, reference)
    n, b = image.shape[0], all_image.shape[0]
    for name, got, want in (
        ("text", text.shape, image.shape),
        ("batch image", all_image.shape[1:], image.shape[1:]),
        ("batch text", all_text.shape, all_image.shape),
        ("reference", (reference.n,), (n,)),
        ("batch reference", (all_reference.n,), (b,)),
    ):
        if got != want:
            raise ValueError(f"steered_loss: {name} has shape {tuple(got)}, expected {tuple(want)}")
    if not 0 <= offset <= b - n:
        raise ValueError(f"steered_loss: rows [{offset}, {offset + n}) are not rows of a batch of {b}")
    ref_image, ref_text, all_ref_image, all_ref_text = (  # the frozen reference: constants
        t.detach().to(image.dtype)
        for t in (reference.image, reference.text, all_reference.image, all_reference.text)
    )
    positives = torch.arange(n, device=image.device) + offset
    per_image = scale * (image @ all_text.T - ref_image @ all_ref_text.T)  # [n, b]: D_{i, j}
    if loss == "sigmoid":
        labels = torch.full_like(per_image, -1.0)
        labels[torch.arange(n, device=image.device), positives] = 1.0
        return -F.logsigmoid(labels * (per_image + bias)).sum() / n
    per_text = scale * (text @ all_image.T - ref_text @ all_ref_image.T)  # [n, b]: D_{j, i} for text i
    return (F.cross_entropy(per_image, positives) + F.cross_entropy(per_text, positives)) / 2
