"""Selection diagnostics (the paper's figure 2) on one super-batch of a run's learner and reference.

How much learnability the chunked joint sampler finds as its number of chunks grows, how a brute-force Gibbs
sampler over sub-batches climbs to the same target, and how the selected sub-batch's learnability rises with
the filter ratio; plus the pairwise learnability matrix the sampler works on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from jestclip.selection import (
    DEFAULT_GAIN,
    Embeddings,
    batch_score,
    gibbs_select,
    independent_select,
    joint_select,
    pair_score_matrix,
)
from jestclip.selection.scoring import scoring_uses
from jestclip.train.config import TrainConfig

__all__ = ["SelectionDiagnostics", "run_diagnostics", "run_embeddings", "selection_diagnostics"]


@dataclass
class SelectionDiagnostics:
    """Mean sub-batch scores (``batch_score``) of ``batch_size`` chosen from ``super_batch`` candidates.

    uniform: random sub-batches. chunks: ``{n_chunks: score}`` of ``joint_select``. independent: per-example
    sampling. gibbs_steps / gibbs: the brute-force sampler's score after each number of steps (first seed).
    filter_ratio: ``{f: score}`` of joint selection of ``batch_size`` from the first ``batch_size / (1 - f)``
    candidates. matrix: ``[m, m]`` pair scores of the first m candidates (row i image, column j text).
    """

    scoring: str
    loss: str
    gain: float
    batch_size: int
    super_batch: int
    seeds: int
    uniform: float
    independent: float
    chunks: dict[int, float]
    gibbs_steps: list[int]
    gibbs: list[float]
    filter_ratio: dict[float, float]
    matrix: list[list[float]]


def selection_diagnostics(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    batch_size: int,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = DEFAULT_GAIN,
    chunk_counts: Sequence[int] = (1, 2, 4, 8, 16, 32),
    filter_ratios: Sequence[float] = (0.0, 0.5, 0.8, 0.9),
    filter_chunks: int = 16,
    gibbs_steps: int = 2000,
    seeds: int = 3,
    matrix_size: int = 64,
) -> SelectionDiagnostics:
    """Run every diagnostic on ``[N, D]`` embeddings of one super-batch (N = all candidates)."""
    emb = learner if learner is not None else reference
    n = emb.image.shape[0]
    if not 1 <= batch_size < n:
        raise ValueError(f"batch_size must be in [1, {n - 1}] for a super-batch of {n}, got {batch_size}")
    needed = round(batch_size / (1.0 - max(filter_ratios)))
    if needed > n:
        raise ValueError(
            f"filter ratio {max(filter_ratios)} needs {needed} candidates for batch_size {batch_size}; "
            f"got {n}"
        )
    device = emb.image.device
    kw = {"scoring": scoring, "loss": loss}

    def mean_over_seeds(select) -> float:
        scores = []
        for seed in range(seeds):
            generator = torch.Generator(device=device).manual_seed(seed)
            scores.append(float(batch_score(learner, reference, select(generator), **kw)))
        return sum(scores) / len(scores)

    uniform = mean_over_seeds(lambda g: torch.randperm(n, generator=g, device=device)[:batch_size])
    independent = mean_over_seeds(
        lambda g: independent_select(learner, reference, size=batch_size, gain=gain, generator=g, **kw)
    )
    chunks = {
        c: mean_over_seeds(
            lambda g, c=c: joint_select(
                learner, reference, size=batch_size, n_chunks=c, gain=gain, generator=g, **kw
            )
        )
        for c in chunk_counts
        if c <= batch_size
    }
    trace = gibbs_select(
        learner,
        reference,
        size=batch_size,
        n_steps=gibbs_steps,
        gain=gain,
        generator=torch.Generator(device=device).manual_seed(0),
        **kw,
    )
    filter_scores = {}
    for f in filter_ratios:
        candidates = round(batch_size / (1.0 - f))
        sub_l, sub_r = (_head(e, candidates) for e in (learner, reference))
        if candidates == batch_size:
            filter_scores[f] = float(batch_score(sub_l, sub_r, torch.arange(batch_size, device=device), **kw))
            continue
        filter_scores[f] = mean_over_seeds(
            lambda g, sub_l=sub_l, sub_r=sub_r: joint_select(
                sub_l,
                sub_r,
                size=batch_size,
                n_chunks=min(filter_chunks, batch_size),
                gain=gain,
                generator=g,
                **kw,
            )
        )
    m = min(matrix_size, n)
    matrix = pair_score_matrix(_head(learner, m), _head(reference, m), scoring=scoring)
    return SelectionDiagnostics(
        scoring=scoring,
        loss=loss,
        gain=gain,
        batch_size=batch_size,
        super_batch=n,
        seeds=seeds,
        uniform=uniform,
        independent=independent,
        chunks=chunks,
        gibbs_steps=list(range(gibbs_steps + 1)),
        gibbs=[float(s) for s in trace.scores],
        filter_ratio=filter_scores,
        matrix=matrix.float().cpu().tolist(),
    )


def _head(emb: Embeddings | None, k: int) -> Embeddings | None:
    if emb is None:
        return None
    return Embeddings(emb.image[:k], emb.text[:k], emb.scale, emb.bias)


def run_embeddings(
    run_dir: str | Path, *, size: int, device: str | torch.device = "cpu"
) -> tuple[Embeddings, Embeddings | None, TrainConfig]:
    """(learner, reference, config) embeddings of the first ``size`` samples of a run's training data, the
    run rebuilt through the training setup: the learner is the run's weights (``RunDir.weights``), the
    reference its cached embeddings (None when its method needs none).
    """
    from jestclip.data.loader import expand_urls
    from jestclip.train.startup import Placement, open_reference, open_stream, to_device
    from jestclip.train.steps import score_embeddings
    from jestclip.train.trained import load_trained

    where = Placement(torch.device(device))
    trained = load_trained(run_dir, device=where.device)  # the run's config: model, loss, preprocessing
    cfg, model = trained.config, trained.model
    urls = expand_urls(cfg.data)
    stream = open_stream(cfg, urls, trained.transform, where, batch_size=size, resampled=False)
    batch = next(iter(stream))
    if len(batch) < size:
        raise ValueError(f"run {run_dir}: its data {cfg.data} holds only {len(batch)} samples, not {size}")
    reference = open_reference(cfg, urls)
    tensors = to_device(batch, trained.tokenize, reference, where.device)
    return score_embeddings(model, tensors, None), tensors.reference, cfg


def run_diagnostics(
    run_dir: str | Path,
    *,
    batch_size: int = 64,
    gibbs_steps: int = 2000,
    filter_ratio: float | None = None,
    device: str | torch.device = "cpu",
) -> SelectionDiagnostics:
    """``selection_diagnostics`` on the first ``batch_size / (1 - filter_ratio)`` samples of a run's data,
    with the run's scoring, loss and gain (the learner's embeddings only where its scoring uses them), at
    filter ratios 0, 0.5 and ``filter_ratio`` (default: the run's own f: the super-batch has the run's shape).
    """
    from jestclip.train.rundir import RunDir

    if filter_ratio is None:
        filter_ratio = float(RunDir(run_dir).read_config().get("filter_ratio", 0.8))
    size = round(batch_size / (1.0 - filter_ratio))
    learner, reference, cfg = run_embeddings(run_dir, size=size, device=device)
    method = cfg.method
    uses_learner, _ = scoring_uses(method.scoring)
    return selection_diagnostics(
        learner if uses_learner else None,
        reference,
        batch_size=batch_size,
        scoring=method.scoring,
        loss=method.loss,
        gain=method.gain,
        filter_ratios=tuple(sorted({0.0, 0.5, filter_ratio})),
        gibbs_steps=gibbs_steps,
    )
