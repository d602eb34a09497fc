"""Evaluate a CLIP model on eval suites: encode each suite once (batched), then every task on the features.

The headline number is ``average``: the mean of every suite's zero-shot and few-shot top-1 accuracies and
its image→text and text→image R@1 (R@5 is reported but not averaged) — the "average downstream accuracy"
the paper plots. Steadier variants are reported beside it, not averaged: ``gallery:`` recall within fixed
galleries of ``GALLERY_SIZE`` pairs, ``fewshot_mean:FIELD``, the balanced few-shot accuracy averaged over
``FEWSHOT_SEEDS`` split seeds, and ``gallery_r5``, the gallery R@5 of every retrieval suite averaged: the
candidate with the largest signal over its evaluation noise (docs/studies/study2.md, "The metric, registered
before the runs").

A metric a suite is too small for is left out with a warning, never reported as a value (docs/eval.md,
"Size limits"): retrieval R@k needs more than k pairs (every query finds its match among k or fewer), the
``gallery:`` metrics a gallery's ``GALLERY_SIZE`` pairs, a few-shot probe two classes with more than
``shots`` examples (a probe of one class scores 100%). A suite with nothing averaged has no ``average``; the
overall one is over what was measured.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor, nn
from torch.utils.data import DataLoader

from jestclip.data.loader import SuperBatchStream, read_shard
from jestclip.data.progress import progress as progress_bar
from jestclip.eval.metrics import (
    balanced_accuracy,
    fewshot_predict,
    fewshot_split,
    gallery_recall,
    retrieval_recall,
    top1_accuracy,
    zeroshot_predict,
)
from jestclip.eval.suites import EvalSuite

__all__ = [
    "SuiteFeatures",
    "check_labels",
    "encode_suite",
    "evaluate",
    "evaluate_suite",
    "flat_metrics",
    "format_table",
    "gallery_r5",
    "is_averaged",
    "suite_metrics",
    "zero_shot_classifiers",
]

DEFAULT_SHOTS = 10
GALLERY_SIZE = 100  # pairs per retrieval gallery of the ``gallery:`` metrics (and the fewest they need)
RETRIEVAL_KS = (1, 5)  # the recalls reported; R@k needs more than k pairs
FEWSHOT_SEEDS = 5  # split seeds ``seed .. seed + 4`` the ``fewshot_mean:`` metrics average over


def is_averaged(metric: str) -> bool:
    """Whether a metric name enters the suite average: class-balanced zero-shot and few-shot accuracy and
    image→text / text→image R@1 (plain top-1 and R@5 are reported, not averaged)."""
    return metric.startswith(("zeroshot_balanced:", "fewshot_balanced:")) or metric in (
        "retrieval:i2t_r@1",
        "retrieval:t2i_r@1",
    )


@dataclass
class SuiteFeatures:
    """Normalised features of N eval samples: image, text ``[N, D]``; labels ``{field: [N]}`` (-1 where a
    sample has none); concepts ``[N]`` ids for retrieval matching; keys: N sample keys.
    """

    image: Tensor
    text: Tensor
    labels: dict[str, Tensor]
    concepts: Tensor
    keys: list[str]


def _label(meta: dict[str, Any], field: str) -> Any:
    labels = meta.get("labels")
    if isinstance(labels, dict) and field in labels:
        return labels[field]
    return meta.get(field, -1)


def _label_error(suite: EvalSuite, key: str, url: str, field: str, value: Any) -> ValueError | None:
    """The error of a sample whose ``field`` label is no class id of the suite (-1: no label), else None."""
    n_classes = len(suite.classes.get(field, ())) or None  # None: ids are not checked against names
    if isinstance(value, int) and not isinstance(value, bool) and -1 <= value < (n_classes or value + 1):
        return None
    return ValueError(
        f"suite {suite.name!r}: sample {key!r} in {url} has label {field}={value!r}; expected an integer "
        f"class id in [0, {n_classes or 'C'})"
    )


def check_labels(suite: EvalSuite, *, limit: int | None = None) -> int:
    """Check the label ids of the suite's first ``limit`` samples (all when None) as ``encode_suite`` will,
    reading only their JSON (no image is decoded): a ValueError names the first bad sample, so that a run
    fails before its first step, not at its final evaluation. Returns the number of samples read."""
    read = 0
    for url in suite.urls:
        for raw in read_shard(url, lambda reason: None):  # unreadable samples: encode_suite skips them too
            if limit is not None and read >= limit:
                return read
            read += 1
            try:
                meta = json.loads(raw.get("json", b"{}").decode("utf-8"))
            except (ValueError, RecursionError):
                continue
            for field in suite.label_fields if isinstance(meta, dict) else ():
                error = _label_error(suite, raw["__key__"], url, field, _label(meta, field))
                if error is not None:
                    raise error
    return read


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def encode_suite(
    model: nn.Module,
    suite: EvalSuite,
    *,
    tokenize: Callable[[list[str]], Tensor],
    transform: Callable,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> SuiteFeatures:
    """Image and caption features of the suite's first ``limit`` samples (all when None), in shard order."""
    device = torch.device(device)
    stream = SuperBatchStream(
        suite.urls, batch_size=batch_size, transform=transform, shuffle_shards=False, rank=0, world_size=1
    )
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    images, texts, keys, concept_names = [], [], [], []
    labels: dict[str, list[int]] = {f: [] for f in suite.label_fields}
    bar = progress_bar(total=limit, desc=f"eval {suite.name}", unit="img", disable=not progress, leave=False)
    for batch in loader:
        take = len(batch) if limit is None else min(len(batch), limit - len(keys))
        with _autocast(device):
            images.append(model.encode_image(batch.images[:take].to(device), normalize=True).float())
            texts.append(model.encode_text(tokenize(batch.texts[:take]).to(device), normalize=True).float())
        for key, url, text, meta in zip(
            batch.keys[:take], batch.urls[:take], batch.texts[:take], batch.meta[:take], strict=True
        ):
            keys.append(key)
            concept_names.append(str(meta.get("concept", text)))
            for field, values in labels.items():
                value = _label(meta, field)
                error = _label_error(suite, key, url, field, value)
                if error is not None:
                    raise error
                values.append(value)
        bar.update(take)
        if limit is not None and len(keys) >= limit:
            break
    bar.close()
    if not keys:
        raise ValueError(f"suite {suite.name!r}: no decodable samples in {len(suite.urls)} shard(s)")
    concept_ids = {name: i for i, name in enumerate(dict.fromkeys(concept_names))}
    return SuiteFeatures(
        image=torch.cat(images),
        text=torch.cat(texts),
        labels={f: torch.tensor(v, device=device) for f, v in labels.items()},
        concepts=torch.tensor([concept_ids[c] for c in concept_names], device=device),
        keys=keys,
    )


@torch.no_grad()
def zero_shot_classifiers(
    model: nn.Module,
    suite: EvalSuite,
    *,
    tokenize: Callable[[list[str]], Tensor],
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """``{field: [D, C] class embeddings}`` of the suite's zero-shot tasks (open_clip's classifier)."""
    fields = [t.partition(":")[2] for t in suite.tasks if t.startswith("zeroshot:")]
    with _autocast(torch.device(device)):
        return {
            f: build_zero_shot_classifier(
                model, tokenize, suite.classes[f], suite.templates, device=device
            ).float()
            for f in fields
        }


def suite_metrics(
    feats: SuiteFeatures,
    suite: EvalSuite,
    classifiers: dict[str, Tensor],
    *,
    shots: int = DEFAULT_SHOTS,
    seed: int = 0,
) -> dict[str, float]:
    """``{task metric: value, "average": ...}`` of one suite from its encoded features (pure: no model)."""
    out: dict[str, float] = {}
    for task in suite.tasks:
        kind, _, field = task.partition(":")
        if kind == "retrieval":
            n = len(feats.keys)
            ks = tuple(k for k in RETRIEVAL_KS if n > k)
            if len(ks) < len(RETRIEVAL_KS):
                left_out = ", ".join(f"R@{k}" for k in RETRIEVAL_KS if k not in ks)
                _left_out(suite, f"retrieval {left_out}", f"{n} pairs; R@k needs more than k")
            if ks:
                recall = retrieval_recall(feats.image, feats.text, feats.concepts, ks=ks)
                out.update({f"retrieval:{k}": v for k, v in recall.items()})
            if n < GALLERY_SIZE:
                _left_out(suite, "the gallery: metrics", f"{n} pairs, fewer than a gallery of {GALLERY_SIZE}")
                continue
            recall = gallery_recall(feats.image, feats.text, feats.concepts, size=GALLERY_SIZE, seed=seed)
            out.update({f"gallery:{k}": v for k, v in recall.items()})
            continue
        labelled = feats.labels[field] >= 0
        if not bool(labelled.any()):
            raise ValueError(f"suite {suite.name!r}: no sample has a {field!r} label for task {task!r}")
        image, label = feats.image[labelled], feats.labels[field][labelled]
        if kind == "zeroshot":
            predictions = zeroshot_predict(image, classifiers[field])
            out[task] = top1_accuracy(predictions, label)
            out[f"zeroshot_balanced:{field}"] = balanced_accuracy(predictions, label)
            continue
        try:
            train, test = fewshot_split(label, shots=shots, seed=seed)
        except ValueError as exn:  # fewer than two classes of more than `shots` (or under `limit`)
            warnings.warn(f"suite {suite.name!r}: task {task!r} skipped: {exn}", stacklevel=2)
            continue
        predictions = fewshot_predict(image[train], label[train], image[test])
        out[task] = top1_accuracy(predictions, label[test])
        out[f"fewshot_balanced:{field}"] = balanced_accuracy(predictions, label[test])
        balanced = [out[f"fewshot_balanced:{field}"]]
        for split_seed in range(seed + 1, seed + FEWSHOT_SEEDS):
            train, test = fewshot_split(label, shots=shots, seed=split_seed)
            predictions = fewshot_predict(image[train], label[train], image[test])
            balanced.append(balanced_accuracy(predictions, label[test]))
        out[f"fewshot_mean:{field}"] = sum(balanced) / len(balanced)
    averaged = [v for k, v in out.items() if is_averaged(k)]
    if averaged:
        out["average"] = sum(averaged) / len(averaged)
    else:
        _left_out(suite, "its average", "none of its averaged metrics could be measured")
    return out


def _left_out(suite: EvalSuite, what: str, why: str) -> None:
    warnings.warn(f"suite {suite.name!r}: {what} left out: {why} (docs/eval.md, Size limits)", stacklevel=3)


def evaluate_suite(
    model: nn.Module,
    suite: EvalSuite,
    *,
    tokenize: Callable[[list[str]], Tensor],
    transform: Callable,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    shots: int = DEFAULT_SHOTS,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """``{task metric: value, "average": ..., "samples": N}`` for one suite (model put back in its mode)."""
    was_training = model.training
    model.eval()
    try:
        feats = encode_suite(
            model,
            suite,
            tokenize=tokenize,
            transform=transform,
            batch_size=batch_size,
            device=device,
            limit=limit,
            num_workers=num_workers,
            progress=progress,
        )
        classifiers = zero_shot_classifiers(model, suite, tokenize=tokenize, device=device)
    finally:
        model.train(was_training)
    return {**suite_metrics(feats, suite, classifiers, shots=shots, seed=seed), "samples": len(feats.keys)}


def gallery_r5(suites: dict[str, dict[str, float]]) -> float | None:
    """Image→text and text→image R@5 within galleries of ``GALLERY_SIZE`` pairs, averaged over both
    directions and every suite that has retrieval (``{suite: suite_metrics}``); None when none has. Chance
    is about 5% (more with repeated concepts; a suite of fewer than 100 pairs has no gallery); an untrained
    ``jest-micro`` scores 5.6%. Study II's primary metric: 16.8 times its evaluation sd in IID's gain on the
    benchmark, against 3.9 for ``average`` (docs/studies/study2.md).
    """
    values = [
        m[f"gallery:{d}_r@5"] for m in suites.values() for d in ("i2t", "t2i") if f"gallery:{d}_r@5" in m
    ]
    return sum(values) / len(values) if values else None


def evaluate(model: nn.Module, suites: list[EvalSuite], **kwargs: Any) -> dict[str, Any]:
    """``{"suites": {name: metrics}, "average": mean of every suite's averaged metrics, "gallery_r5": ...}``
    (``gallery_r5`` None without a retrieval suite); kwargs as ``evaluate_suite``.
    """
    if not suites:
        raise ValueError("no eval suites given")
    results = {suite.name: evaluate_suite(model, suite, **kwargs) for suite in suites}
    averaged = [v for metrics in results.values() for k, v in metrics.items() if is_averaged(k)]
    if not averaged:
        sizes = ", ".join(f"{name!r} ({metrics['samples']} pairs)" for name, metrics in results.items())
        raise ValueError(
            f"no averaged metric can be measured on the eval suites {sizes}: each is too small for its tasks "
            "(docs/eval.md, Size limits)"
        )
    return {"suites": results, "average": sum(averaged) / len(averaged), "gallery_r5": gallery_r5(results)}


def flat_metrics(results: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """``evaluate``'s result as flat ``{"eval/SUITE/METRIC": v, "eval/average": v, "eval/gallery_r5": v}``
    for metric logs (``gallery_r5`` left out when None)."""
    flat = {f"{prefix}average": results["average"]}
    if results.get("gallery_r5") is not None:
        flat[f"{prefix}gallery_r5"] = results["gallery_r5"]
    for suite, metrics in results["suites"].items():
        flat.update({f"{prefix}{suite}/{k}": v for k, v in metrics.items() if k != "samples"})
    return flat


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per (suite, metric), accuracies in percent."""
    rows = [("suite", "metric", "value")]
    for suite, metrics in results["suites"].items():
        for key, value in metrics.items():
            rows.append((suite, key, str(value) if key == "samples" else f"{100 * value:.2f}"))
    rows.append(("all", "average", f"{100 * results['average']:.2f}"))
    if results.get("gallery_r5") is not None:
        rows.append(("all", "gallery_r5", f"{100 * results['gallery_r5']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
