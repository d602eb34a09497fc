"""How far a chunk-update backend's selection is from the exact path's: the evidence for a precision.

``selection_agreement`` runs ``joint_select`` once per backend on one Gumbel draw (the same seed) and
compares each selection with the baseline's (the ``torch`` backend in float32 by default), and compares
each backend's conditional scores with the baseline's along the baseline's own chunks, so a difference in
the scores is not confounded with a difference in what was selected. The yardstick is the sampler's own
variability: how many picks a redraw of the Gumbel noise changes. ``choose_default`` is the rule that turns
such a table (and the times) into the CUDA default (docs/selection.md, "The fused chunk update").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from jestclip.selection.embeddings import Embeddings
from jestclip.selection.fused import check_backend
from jestclip.selection.joint import DEFAULT_GAIN, joint_select
from jestclip.selection.sampling import chunk_sizes
from jestclip.selection.scoring import ConditionalScores, resolve_inputs

__all__ = ["NOISE_SHARE", "Agreement", "choose_default", "selection_agreement"]

# The rule (docs/selection.md, "The fused chunk update"): a backend may be the default if, under the same
# Gumbel noise, it changes at most this share of the picks that redrawing the noise changes.
NOISE_SHARE = 0.1


@dataclass(frozen=True)
class Agreement:
    """One backend's selections and scores against the baseline's, on the same inputs and Gumbel draws.

    same_picks: mean over the seeds of the share of the baseline's ``size`` picks the backend also picks
        under the same noise (1.0: the same set each time); min_same_picks: the least of them.
    same_chunks: the fewest leading chunks, over the seeds, that hold exactly the baseline's picks (as sets).
    noise_picks: the same share between two baseline selections with different seeds: what redrawing the
        Gumbel noise alone changes (the sampler's own variability, the yardstick of ``choose_default``).
    max_error: the largest ``|c_k(S) - c_k^base(S)|`` over every chunk t and every candidate still
        available before it, S the first t - 1 chunks of the baseline's first seed (score units).
    relative_error: the largest, over chunks, of that chunk's max error over the standard deviation of the
        baseline's scores of the same candidates (the scores' spread).
    gain: the sampling gain, so ``logit_error = gain * max_error`` is in units of the Gumbel noise's scale.
    """

    backend: str
    same_picks: float
    min_same_picks: float
    same_chunks: int
    n_chunks: int
    noise_picks: float
    max_error: float
    relative_error: float
    gain: float

    @property
    def logit_error(self) -> float:
        """The largest change of a sampling logit ``gain * c_k(S)``, in units of the Gumbel scale (1)."""
        return self.gain * self.max_error

    @property
    def qualifies(self) -> bool:
        """Whether it changes at most ``NOISE_SHARE`` of the picks that a redraw of the noise changes."""
        return 1.0 - self.same_picks <= NOISE_SHARE * (1.0 - self.noise_picks)


def _scores_along(
    learner: Embeddings | None,
    reference: Embeddings | None,
    chunks: Sequence[Tensor],
    *,
    scoring: str,
    loss: str,
    backend: str,
) -> list[Tensor]:
    """``[B]`` conditional scores before each chunk of ``chunks`` (float64; -inf where not available)."""
    state = ConditionalScores.from_embeddings(learner, reference, scoring=scoring, loss=loss, backend=backend)
    available = state.inputs.usable.clone()
    out = []
    for chunk in chunks:
        scores = state.conditional().to(torch.float64)
        out.append(scores.masked_fill(~available, float("-inf")))
        available[chunk] = False
        state.absorb_indices(chunk)
    return out


def _errors(scores: Sequence[Tensor], base: Sequence[Tensor]) -> tuple[float, float]:
    """(largest absolute error, largest per-chunk error over the baseline's standard deviation)."""
    max_error, relative_error = 0.0, 0.0
    for mine, theirs in zip(scores, base, strict=True):
        live = torch.isfinite(theirs)
        error = float((mine[live] - theirs[live]).abs().max())
        spread = float(theirs[live].std()) if int(live.sum()) > 1 else 0.0
        max_error = max(max_error, error)
        ratio = error / spread if spread > 0 else (0.0 if error == 0 else math.inf)
        relative_error = max(relative_error, ratio)
    return max_error, relative_error


def selection_agreement(
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    size: int,
    backends: Sequence[str],
    baseline: str = "torch",
    n_chunks: int = 16,
    scoring: str = "learnability",
    loss: str = "sigmoid",
    gain: float = DEFAULT_GAIN,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[Agreement]:
    """One ``Agreement`` per backend of ``backends`` (``fused.BACKENDS``) against ``baseline``.

    Each selection draws ``size`` of the B candidates in ``n_chunks`` chunks (Sections 2.1 and A.2 of the
    paper) with a generator seeded from ``seeds`` on the embeddings' device; a backend and the baseline
    share each seed's noise. The baseline's noise yardstick compares its seed ``seeds[i]`` with
    ``seeds[i + 1]`` (with one seed, with ``seeds[0] + 1``). Scores are compared in float64 along the
    baseline's chunks of the first seed. The baseline runs as the caller's torch settings say: turn TF32 off
    (``torch.backends.cuda.matmul.allow_tf32 = False``, torch's default) for a float32 baseline. Raises
    ValueError as ``joint_select`` does, for no seeds, or for a backend that cannot run on the device.
    """
    inputs = resolve_inputs(learner, reference, scoring, loss, caller="selection_agreement")
    for name in (baseline, *backends):
        check_backend(name, inputs.device, "selection_agreement", loss)
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("selection_agreement: seeds must name at least one seed")

    def select(backend: str, seed: int) -> Tensor:
        generator = torch.Generator(inputs.device).manual_seed(seed)
        common = {"size": size, "n_chunks": n_chunks, "scoring": scoring, "loss": loss, "gain": gain}
        return joint_select(learner, reference, **common, generator=generator, backend=backend)

    def overlap(a: Tensor, b: Tensor) -> float:
        return len(set(a.tolist()) & set(b.tolist())) / size

    sizes = chunk_sizes(size, n_chunks)
    base = {seed: select(baseline, seed) for seed in seeds}
    pairs = list(itertools.pairwise(seeds)) or [(seeds[0], seeds[0] + 1)]
    others = {b: base[b] if b in base else select(baseline, b) for _, b in pairs}
    noise_picks = sum(overlap(base[a], others[b]) for a, b in pairs) / len(pairs)
    base_chunks = list(base[seeds[0]].split(sizes))
    along = {"scoring": scoring, "loss": loss}
    base_scores = _scores_along(learner, reference, base_chunks, **along, backend=baseline)
    rows = []
    for backend in backends:
        shares, leading = [], []
        for seed in seeds:
            picks = select(backend, seed)
            shares.append(overlap(picks, base[seed]))
            same = 0
            for mine, theirs in zip(picks.split(sizes), base[seed].split(sizes), strict=True):
                if set(mine.tolist()) != set(theirs.tolist()):
                    break
                same += 1
            leading.append(same)
        scores = _scores_along(learner, reference, base_chunks, **along, backend=backend)
        max_error, relative_error = _errors(scores, base_scores)
        rows.append(
            Agreement(
                backend=backend,
                same_picks=sum(shares) / len(shares),
                min_same_picks=min(shares),
                same_chunks=min(leading),
                n_chunks=len(sizes),
                noise_picks=noise_picks,
                max_error=max_error,
                relative_error=relative_error,
                gain=gain,
            )
        )
    return rows


def choose_default(rows: Sequence[Agreement], times_ms: Mapping[str, float]) -> str | None:
    """The fastest backend (by ``times_ms``: its selection time at the largest B measured) whose every row
    in ``rows`` (each size, input and loss measured for it) ``qualifies``; None if none does.

    Backends without a time are left out. The baseline itself, if timed, counts as qualified. This is the
    rule docs/selection.md states for the CUDA default.
    """
    fits: dict[str, bool] = {}
    for row in rows:
        fits[row.backend] = fits.get(row.backend, True) and row.qualifies
    qualified = [b for b in times_ms if fits.get(b, b == "torch")]
    return min(qualified, key=lambda b: times_ms[b]) if qualified else None
