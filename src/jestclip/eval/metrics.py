"""Evaluation metrics on precomputed, L2-normalised features: zero-shot classification, retrieval recall@k,
few-shot linear probe; classification scored as top-1 and as class-balanced accuracy (the mean of per-class
recalls, so that predicting a suite's largest class for every image scores 1/C, not its share of the suite).
Pure tensor math (no models, no I/O); similarity matrices are built a block of rows at a time, so memory is
``[block, N]``, never ``[N, N]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "balanced_accuracy",
    "fewshot_linear_probe",
    "fewshot_predict",
    "fewshot_split",
    "galleries",
    "gallery_recall",
    "retrieval_recall",
    "top1_accuracy",
    "zeroshot_predict",
    "zeroshot_top1",
]

DEFAULT_BLOCK = 1024


def top1_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of ``[N]`` predictions equal to the ``[N]`` labels."""
    return float((predictions.cpu() == labels.cpu()).double().mean())


def balanced_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class predicted right (``[N]``
    each): every class weighs the same, however many examples it has."""
    predictions, labels = predictions.cpu(), labels.cpu()
    classes, inverse = torch.unique(labels, return_inverse=True)
    right = torch.zeros(len(classes), dtype=torch.float64).index_add_(
        0, inverse, (predictions == labels).double()
    )
    return float((right / torch.bincount(inverse, minlength=len(classes))).mean())


def zeroshot_predict(image_features: Tensor, class_weights: Tensor) -> Tensor:
    """``[N]`` id of the nearest class embedding: image_features ``[N, D]``, class_weights ``[D, C]``
    (open_clip's zero-shot classifier layout)."""
    if image_features.shape[1] != class_weights.shape[0]:
        raise ValueError(f"feature dim {image_features.shape[1]} != classifier dim {class_weights.shape[0]}")
    if image_features.shape[0] == 0:
        raise ValueError("no images to classify")
    return torch.cat(
        [
            (image_features[start : start + DEFAULT_BLOCK] @ class_weights).argmax(dim=1).cpu()
            for start in range(0, image_features.shape[0], DEFAULT_BLOCK)
        ]
    )


def _check_labels(labels: Tensor, n: int, n_classes: int) -> None:
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got {labels.min()}..{labels.max()}")


def zeroshot_top1(image_features: Tensor, class_weights: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of the nearest class embedding (shapes as ``zeroshot_predict``; labels ``[N]``)."""
    _check_labels(labels, image_features.shape[0], class_weights.shape[1])
    return top1_accuracy(zeroshot_predict(image_features, class_weights), labels)


def _recall(queries: Tensor, gallery: Tensor, q_ids: Tensor, g_ids: Tensor, ks: tuple[int, ...], block: int):
    k_max = min(max(ks), gallery.shape[0])
    hits = torch.zeros(len(ks), dtype=torch.long)
    for start in range(0, queries.shape[0], block):
        sims = queries[start : start + block] @ gallery.T  # [block, N]
        top = sims.topk(k_max, dim=1).indices  # [block, k_max]
        match = g_ids[top] == q_ids[start : start + block, None]  # [block, k_max]
        for i, k in enumerate(ks):
            hits[i] += int(match[:, :k].any(dim=1).sum())
    return {k: int(h) / queries.shape[0] for k, h in zip(ks, hits, strict=True)}


def retrieval_recall(
    image_features: Tensor,
    text_features: Tensor,
    concepts: Tensor,
    *,
    ks: tuple[int, ...] = (1, 5),
    block: int = DEFAULT_BLOCK,
) -> dict[str, float]:
    """Image→text and text→image recall@k over N paired samples.

    image_features, text_features: ``[N, D]`` (row i of each is pair i); concepts: ``[N]`` integer concept
    ids — a retrieved item counts as correct when it shares the query's concept (the same emoji drawn in four
    styles has four equally right captions). Returns ``{"i2t_r@1": ..., "t2i_r@1": ..., ...}``.
    """
    n = image_features.shape[0]
    if text_features.shape[0] != n or concepts.numel() != n:
        raise ValueError(
            f"retrieval needs paired rows: {n} images, {text_features.shape[0]} texts, {concepts.numel()} ids"
        )
    if n == 0:
        raise ValueError("no pairs to retrieve")
    concepts = concepts.to(image_features.device)
    i2t = _recall(image_features, text_features, concepts, concepts, ks, block)
    t2i = _recall(text_features, image_features, concepts, concepts, ks, block)
    out = {f"i2t_r@{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r@{k}": v for k, v in t2i.items()})
    return out


def galleries(n: int, size: int, *, seed: int = 0) -> Tensor:
    """``[G, s]`` sample indices: ``G = max(1, n // size)`` disjoint galleries of ``s = min(size, n)`` pairs
    drawn by ``torch.randperm(n)`` from a CPU generator seeded with ``seed`` (the last ``n - G·s`` pairs of
    the permutation, fewer than ``size``, are left out; n < size gives one gallery of all n). A ValueError
    for n < 1 or size < 1.
    """
    if n < 1 or size < 1:
        raise ValueError(f"galleries: need n >= 1 and size >= 1, got n={n}, size={size}")
    s = min(size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: (n // s) * s].view(-1, s)


def gallery_recall(
    image_features: Tensor,
    text_features: Tensor,
    concepts: Tensor,
    *,
    size: int = 100,
    seed: int = 0,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """``retrieval_recall`` within fixed galleries of ``size`` pairs (``galleries``), averaged over their
    queries: every suite is then scored against the same number of distractors (chance R@1 is 1/size, up to
    concept matches), so suites of 200 and 6,000 pairs measure the same task. Shapes and keys as
    ``retrieval_recall``.
    """
    n = image_features.shape[0]
    if text_features.shape[0] != n or concepts.numel() != n:
        raise ValueError(
            f"retrieval needs paired rows: {n} images, {text_features.shape[0]} texts, {concepts.numel()} ids"
        )
    groups = galleries(n, size, seed=seed).to(image_features.device)
    concepts = concepts.to(image_features.device)
    totals: dict[str, float] = {}
    for group in groups:
        recall = retrieval_recall(image_features[group], text_features[group], concepts[group], ks=ks)
        for key, value in recall.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(groups) for key, value in totals.items()}


def fewshot_split(labels: Tensor, *, shots: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train [C' * shots], test [rest])``: ``shots`` random examples of every class that has more
    than ``shots`` examples; the remaining examples of those classes are the test set. Classes with
    ``shots`` or fewer examples are left out (they could not be both learnt and tested). A ValueError when
    fewer than two classes are left: a probe of one class predicts it and scores 100%, which measures
    nothing.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train, test = [], []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        if members.numel() <= shots:
            continue
        members = members[torch.randperm(members.numel(), generator=generator)]
        train.append(members[:shots])
        test.append(members[shots:])
    if not train:
        raise ValueError(f"no class has more than {shots} examples; few-shot evaluation is impossible")
    if len(train) < 2:
        raise ValueError(
            f"only one class has more than {shots} examples; a probe of one class scores 100% and measures "
            "nothing"
        )
    return torch.cat(train), torch.cat(test)


def fewshot_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    l2: float = 1e-3,
) -> Tensor:
    """``[M]`` labels a ridge-regression linear probe on frozen features predicts for the test features
    (big_vision's few-shot evaluator): least squares from ``[n, D]`` features (plus a bias) to centred one-hot
    targets, closed form. Labels are any integer ids.
    """
    if train_features.shape[0] != train_labels.numel():
        raise ValueError("features and labels differ in length")
    classes, train_y = torch.unique(train_labels.cpu(), return_inverse=True)
    x = torch.cat(
        [train_features.double().cpu(), torch.ones(train_features.shape[0], 1, dtype=torch.float64)], 1
    )
    targets = torch.nn.functional.one_hot(train_y, len(classes)).double() * 2.0 - 1.0
    gram = x.T @ x + l2 * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, x.T @ targets)  # [D + 1, C]
    xt = torch.cat(
        [test_features.double().cpu(), torch.ones(test_features.shape[0], 1, dtype=torch.float64)], 1
    )
    return classes[(xt @ weights).argmax(dim=1)]


def fewshot_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float = 1e-3,
) -> float:
    """Test top-1 accuracy of ``fewshot_predict``'s probe; test labels must all occur in training."""
    if test_features.shape[0] != test_labels.numel():
        raise ValueError("features and labels differ in length")
    unseen = sorted(set(test_labels.cpu().tolist()) - set(train_labels.cpu().tolist()))
    if unseen:
        raise ValueError(f"test labels {unseen[:5]} do not occur in the training examples")
    predictions = fewshot_predict(train_features, train_labels, test_features, l2=l2)
    return top1_accuracy(predictions, test_labels)
