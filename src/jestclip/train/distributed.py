"""Joint selection over a super-batch sharded across data-parallel ranks.

Every rank holds ``B / W`` candidates (rank r holds global indices ``[r·B/W, (r+1)·B/W)``) and keeps the
running conditional sums of only those. Each chunk:

1. every rank draws the same ``[B]`` Gumbel noise from the shared-seed generator and takes its slice;
2. each rank picks its quota for this chunk (``group_chunk_counts``) from its own candidates;
3. the picks' indices, perturbed scores and embeddings are all-gathered, ordered as the single-process
   sampler orders them, and absorbed by every rank.

So every rank ends with the same global selection — identical to ``joint_select`` with one group per rank
on the concatenated super-batch — and learns on exactly its ``b / W`` examples; no image moves between ranks,
only ``b`` embeddings per model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from jestclip.selection import ConditionalScores, Embeddings, chunk_sizes, group_chunk_counts
from jestclip.selection.checks import check_gain
from jestclip.selection.sampling import gumbel_noise

__all__ = [
    "all_gather_with_grad",
    "average_gradients",
    "distributed_independent_select",
    "distributed_joint_select",
]


def _all_gather(tensor: Tensor, group=None) -> list[Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def distributed_joint_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    n_chunks: int = 16,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = 100.0,
    generator: torch.Generator,
    group=None,
) -> tuple[Tensor, Tensor]:
    """Select ``size`` of the ``W·B_local`` candidates sharded over the ranks of ``group``.

    learner, reference: this rank's ``[B_local, D]`` embeddings (the same ``B_local`` on every rank).
    generator: seeded identically on every rank (a CPU generator is simplest).
    Returns ``(local, global_)``: indices of this rank's ``size / W`` picks into its own candidates, and the
    whole selection as global indices in selection order (the same on every rank).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if size % world:
        raise ValueError(f"size={size} must be divisible by the world size {world}")
    gain = check_gain(gain, "distributed_joint_select")
    state = ConditionalScores.from_embeddings(learner, reference, scoring=scoring, loss=loss)
    inputs = state.inputs
    n_local, device = inputs.n, inputs.device
    sizes = torch.tensor([n_local], device=device)
    if len({int(s) for s in _all_gather(sizes, group)}) != 1:
        raise ValueError("every rank must hold the same number of candidates")
    quota = size // world
    short = torch.tensor([int(int(inputs.usable.sum()) < quota)], device=device)
    dist.all_reduce(short, group=group)
    if int(short):
        raise ValueError(f"{int(short)} rank(s) hold fewer than {quota} usable candidates")

    available = inputs.usable.clone()
    offset = rank * n_local
    chunks = chunk_sizes(size, min(n_chunks, size))
    counts = group_chunk_counts([quota] * world, chunks)
    local_picks: list[Tensor] = []
    global_picks: list[Tensor] = []
    for t, chunk_counts in enumerate(counts):
        logits = (state.conditional() * gain).masked_fill(~available, float("-inf"))
        noise = gumbel_noise(
            world * n_local, generator=generator, device=generator.device, dtype=logits.dtype
        )
        perturbed = logits + noise[offset : offset + n_local].to(device)
        mine = torch.topk(perturbed, chunk_counts[rank]).indices
        available[mine] = False
        local_picks.append(mine)

        # exchange (global index, perturbed score, embeddings) padded to the largest per-rank count
        width = max(chunk_counts)
        pad = width - mine.numel()
        index = torch.cat([mine + offset, torch.full((pad,), -1, device=device, dtype=torch.long)])
        value = torch.cat([perturbed[mine], torch.zeros(pad, device=device, dtype=perturbed.dtype)])
        all_index, all_value = torch.cat(_all_gather(index, group)), torch.cat(_all_gather(value, group))
        real = all_index >= 0
        order = torch.argsort(all_value[real], descending=True, stable=True)
        chosen = all_index[real][order]
        global_picks.append(chosen)
        if t + 1 == len(counts):
            break
        parts = []
        for _, emb in inputs.models:
            for rows in (emb.image, emb.text):
                local_rows = torch.cat([rows[mine], rows.new_zeros(pad, rows.shape[1])])
                parts.append(torch.cat(_all_gather(local_rows, group))[real][order])
        state.absorb([(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)])
    return torch.cat(local_picks), torch.cat(global_picks)


def distributed_independent_select(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    method: str = "sample",
    gain: float = 100.0,
    generator: torch.Generator,
    group=None,
) -> Tensor:
    """Independent prioritisation on a sharded super-batch: each rank takes its ``size / W`` best candidates
    by unconditional score (perturbed by its slice of the shared Gumbel draw when ``method="sample"``).

    Returns this rank's picks as indices into its own candidates. Only the unconditional context is
    supported: a per-example loss against the whole super-batch would need every rank's embeddings.
    """
    from jestclip.selection import independent_scores

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if size % world:
        raise ValueError(f"size={size} must be divisible by the world size {world}")
    scores = independent_scores(learner, reference, scoring=scoring, loss=loss, context="unconditional")
    n_local = scores.shape[0]
    if method == "sample":
        noise = gumbel_noise(
            world * n_local, generator=generator, device=generator.device, dtype=scores.dtype
        )
        usable = torch.isfinite(scores)
        scores = torch.where(usable, scores * check_gain(gain, "distributed_independent_select"), scores)
        scores = scores + noise[rank * n_local : (rank + 1) * n_local].to(scores.device)
    elif method != "topk":
        raise ValueError(f"method must be 'sample' or 'topk', got {method!r}")
    return torch.topk(scores, size // world).indices


def all_gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``[n, ...]`` tensor in rank order; gradients flow back to each owner."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous(), group=group))


def average_gradients(parameters, group=None) -> None:
    """Average the gradients of ``parameters`` over the ranks with one all-reduce of a flat buffer."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
