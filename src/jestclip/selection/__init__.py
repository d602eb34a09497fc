"""Joint example selection as pure tensor math: no models, no I/O (the distributed forms all-gather through
torch.distributed).

Public API::

    Embeddings(image, text, scale, bias)          # one model's [B, D] embeddings of a super-batch
    conditional_scores(learner, reference, selected, scoring=, loss=)  -> [B]
    batch_score(learner, reference, indices, scoring=, loss=)           -> scalar
    joint_select(learner, reference, size=, n_chunks=, scoring=, loss=, gain=, generator=, groups=,
                 backend=) -> [size]                # backend: fused.BACKENDS (torch | triton-<p> | ...)
    independent_select(learner, reference, size=, scoring=, loss=, context=, method=, gain=, generator=)
    distributed_joint_select / distributed_independent_select(...)  # this rank's shard (torch.distributed)
    SELECTORS["joint" | "independent"].select(learner, reference, settings, size=, ..., world_size=)
    reference_scores(fetch, n, score=, loss=, batch_size=, seed=) -> [N]   # static filter (DataComp)
    keep_mask(scores, keep) / score_threshold(scores, keep)
    Exchange / LocalExchange(groups) / DistributedExchange(group)  # where candidates live: exchange=
    gibbs_select(...)                               # brute-force diagnostic (Figure 2)
    steered_loss(image, text, scale, bias, reference, loss)  # DRRho-style loss: learner minus reference
    dense_* / pair_score_matrix                     # O(B²) oracle for small B
    fused.chunk_terms(...)                          # the Triton chunk update (Triton optional)
    agreement.selection_agreement(...) / choose_default(...)  # a precision's picks vs float32's

Scorings: "learnability" (learner minus reference), "easy_reference", "hard_learner".
Losses: "sigmoid" (SigLIP pair losses), "softmax" (CLIP, Algorithm 3).
"""

from jestclip.selection.contrastive import LOSSES, Loss
from jestclip.selection.dense import (
    dense_batch_score,
    dense_conditional_scores,
    dense_joint_select,
    pair_score_matrix,
)
from jestclip.selection.diagnostics import GibbsTrace, gibbs_select
from jestclip.selection.embeddings import Embeddings, usable_rows
from jestclip.selection.filter import (
    FILTER_SCORES,
    clip_scores,
    keep_count,
    keep_mask,
    loss_batches,
    pair_losses,
    reference_scores,
    score_threshold,
)
from jestclip.selection.independent import (
    distributed_independent_select,
    independent_scores,
    independent_select,
)
from jestclip.selection.joint import (
    DEFAULT_GAIN,
    batch_score,
    conditional_scores,
    distributed_joint_select,
    joint_select,
)
from jestclip.selection.sampling import (
    CandidateGroups,
    DistributedExchange,
    Exchange,
    LocalExchange,
    chunk_sizes,
    group_chunk_counts,
)
from jestclip.selection.scoring import SCORINGS, ConditionalScores, NonFiniteCandidatesWarning, Scoring
from jestclip.selection.selectors import SELECTORS, Selector, get_selector
from jestclip.selection.steering import steered_loss

__all__ = [
    "DEFAULT_GAIN",
    "FILTER_SCORES",
    "LOSSES",
    "SCORINGS",
    "SELECTORS",
    "CandidateGroups",
    "ConditionalScores",
    "DistributedExchange",
    "Embeddings",
    "Exchange",
    "GibbsTrace",
    "LocalExchange",
    "Loss",
    "NonFiniteCandidatesWarning",
    "Scoring",
    "Selector",
    "batch_score",
    "chunk_sizes",
    "clip_scores",
    "conditional_scores",
    "dense_batch_score",
    "dense_conditional_scores",
    "dense_joint_select",
    "distributed_independent_select",
    "distributed_joint_select",
    "get_selector",
    "gibbs_select",
    "group_chunk_counts",
    "independent_scores",
    "independent_select",
    "joint_select",
    "keep_count",
    "keep_mask",
    "loss_batches",
    "pair_losses",
    "pair_score_matrix",
    "reference_scores",
    "score_threshold",
    "steered_loss",
    "usable_rows",
]
