"""What the reference model cost before any learner step: its own training and caching its embeddings."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip

from jestclip.data.loader import IMAGE_EXTENSIONS, distinct_shards, expand_urls
from jestclip.models import create_model, forward_flops, image_size
from jestclip.report.runs import load_run

__all__ = ["ReferenceCost", "count_samples", "reference_cost"]


@dataclass(frozen=True)
class ReferenceCost:
    """The reference run's training FLOPs and the FLOPs of embedding ``cached_samples`` pairs once."""

    run: str
    train_flops: float
    cache_flops: float
    cached_samples: int

    @property
    def total(self) -> float:
        return self.train_flops + self.cache_flops


def count_samples(shards: str | Path | Sequence[str | Path]) -> int:
    """Samples (keys with an image member) in the shards, from the tar headers alone (a shard listed under
    two names counts once, as ``cache-reference`` caches it once)."""
    total = 0
    for url in distinct_shards(expand_urls(shards))[0]:
        with tarfile.open(url) as tar:
            keys = {m.name.rsplit(".", 1)[0] for m in tar if m.name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
        total += len(keys)
    return total


def reference_cost(reference_run: str | Path, cached: str | Path | Sequence[str | Path]) -> ReferenceCost:
    """The cost of a reference trained by ``jestclip train`` (its logged FLOPs) and cached over ``cached``
    (one forward per sample, measured on the reference's model config)."""
    run = load_run(reference_run)
    final = (run.evals or run.train)[-1] if (run.evals or run.train) else {}
    if "flops_total" not in final:
        raise ValueError(f"reference run {run.path} has logged no FLOPs yet")
    name = run.config["model"]
    model = create_model(name)  # first: it registers jestclip's shipped configs with open_clip
    context = open_clip.get_model_config(name)["text_cfg"]["context_length"]
    forward = forward_flops(model, image_size=image_size(name), context_length=context)
    samples = count_samples(cached)
    return ReferenceCost(run.name, float(final["flops_total"]), float(forward.total) * samples, samples)
