"""The static reference-score filter (DataComp's CLIP score) against written-out float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jestclip.selection import (
    LOSSES,
    Embeddings,
    contrastive,
    independent_select,
    keep_count,
    keep_mask,
    loss_batches,
    pair_losses,
    reference_scores,
    score_threshold,
)

from .helpers import make_embeddings


def dense_pair_losses(emb: Embeddings, loss: str) -> torch.Tensor:
    """Each pair's loss in its batch, straight from the definition (float64, [n, n] logits)."""
    x, y = emb.image.double(), emb.text.double()
    logits = emb.scale * x @ y.T
    n = len(x)
    if loss == "softmax":
        return -logits.diag() + 0.5 * (torch.logsumexp(logits, dim=1) + torch.logsumexp(logits, dim=0))
    logits = logits + emb.bias
    out = torch.empty(n, dtype=torch.float64)
    for k in range(n):
        others = [j for j in range(n) if j != k]
        row = sum(math.log1p(math.exp(float(logits[k, j]))) for j in others)
        col = sum(math.log1p(math.exp(float(logits[j, k]))) for j in others)
        out[k] = math.log1p(math.exp(-float(logits[k, k]))) + row + col
    return out


def in_memory(emb: Embeddings):
    return lambda indices: emb.take(indices)


def test_similarity_is_the_cosine_and_keeps_what_easy_reference_topk_keeps():
    ref = make_embeddings(40, 8, seed=3)
    scores = reference_scores(in_memory(ref), 40, score="similarity")
    cosines = torch.tensor([float(ref.image[k] @ ref.text[k]) for k in range(40)], dtype=torch.float64)
    torch.testing.assert_close(scores, cosines, rtol=0, atol=1e-15)
    for keep, k in ((0.25, 10), (0.5, 20), (0.3, 12), (0.9, 36)):
        kept = set(torch.nonzero(keep_mask(scores, keep)).flatten().tolist())
        assert len(kept) == k == keep_count(40, keep)
        assert kept == set(torch.topk(cosines, k).indices.tolist())
        for loss in LOSSES:
            easy = independent_select(None, ref, size=k, scoring="easy_reference", loss=loss, method="topk")
            assert kept == set(easy.tolist()), loss
        # the lowest kept score, up to the last bit: `@` and the elementwise sum round in another order
        assert score_threshold(scores, keep) == pytest.approx(
            float(torch.topk(cosines, k).values[-1]), abs=1e-15
        )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_pair_losses_match_the_dense_formula(loss, n):
    emb = make_embeddings(n, 6, seed=n, scale=12.0, bias=-7.0)
    torch.testing.assert_close(pair_losses(emb, loss), dense_pair_losses(emb, loss), rtol=1e-12, atol=1e-12)


def test_pair_losses_build_no_n_by_n_tile(monkeypatch):
    monkeypatch.setattr(contrastive, "MAX_TILE_ELEMENTS", 64)
    shapes = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: shapes.append((a.shape[0], b.shape[1])) or real_mm(a, b))
    emb = make_embeddings(40, 6, seed=1)
    got = pair_losses(emb, "sigmoid")
    torch.testing.assert_close(got, dense_pair_losses(emb, "sigmoid"), rtol=1e-12, atol=1e-12)
    assert shapes and all(rows * cols <= 40 * 1 for rows, cols in shapes)  # [40, 1] tiles: one column each


def test_loss_batches_cover_the_pool_once_with_a_wrapped_last_batch():
    batches = loss_batches(10, 4, seed=5)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    assert batches.tolist() == [perm[0:4].tolist(), perm[4:8].tolist(), perm[[8, 9, 0, 1]].tolist()]
    assert loss_batches(3, 8, seed=0).shape == (1, 3)  # b = min(batch_size, n)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        loss_batches(3, 0, seed=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_score_is_minus_each_pairs_loss_in_its_seeded_batch(loss):
    n, b, seed = 23, 5, 11
    emb = make_embeddings(n, 6, seed=2, scale=9.0, bias=-5.0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    expected = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, b):
        batch = perm[[(start + i) % n for i in range(b)]]  # the last batch wraps around
        losses = dense_pair_losses(emb.take(batch), loss)
        anchors = min(b, n - start)
        expected[batch[:anchors]] = -losses[:anchors]
    seen = []
    kw = dict(score="loss", loss=loss, batch_size=b, seed=seed, progress=seen.append)
    got = reference_scores(in_memory(emb), n, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert seen == [5, 5, 5, 5, 3]  # every pair scored once


def test_the_loss_score_penalises_a_caption_that_matches_every_image():
    # pairs 0..9: random images, captions close to them; pair 10's caption is the mean direction of those
    # images (boilerplate) and its image lies next to it: the best CLIP score, but it matches every image
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(11, 16, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.1 * torch.randn(11, 16, generator=g, dtype=torch.float64), dim=1)
    text[10] = F.normalize(image[:10].mean(0), dim=0)
    image[10] = F.normalize(text[10] + 0.05 * image[10], dim=0)
    emb = Embeddings(image, text, 10.0, -5.0)
    similarity = reference_scores(in_memory(emb), 11, score="similarity")
    by_loss = reference_scores(in_memory(emb), 11, score="loss", loss="sigmoid", batch_size=11)
    assert int(similarity.argmax()) == 10 and bool(keep_mask(similarity, 10 / 11)[10])
    assert int(by_loss.argmin()) == 10 and not keep_mask(by_loss, 10 / 11)[10]


def test_keep_fraction_one_keeps_everything_and_ties_keep_the_count():
    scores = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.5, 0.1], dtype=torch.float64)
    assert keep_mask(scores, 1.0).all() and score_threshold(scores, 1.0) == 0.1
    # 3 of 6 kept: 0.9, then the tied 0.5s in index order until the count is reached
    assert keep_mask(scores, 0.5).tolist() == [True, False, True, True, False, False]
    assert score_threshold(scores, 0.5) == 0.5
    assert keep_count(5, 0.5) == 3 and keep_count(5, 0.1) == 1 and keep_count(4, 0.125) == 1  # half up


@pytest.mark.parametrize(
    ("scores", "keep", "message"),
    [
        (torch.ones(4), 0.0, r"keep fraction must be in \(0, 1\], got 0.0"),
        (torch.ones(4), 1.5, r"keep fraction must be in \(0, 1\], got 1.5"),
        (torch.ones(4), True, r"keep fraction must be in \(0, 1\], got True"),
        (torch.ones(4), 0.1, "keep fraction 0.1 of 4 pairs keeps none"),
        (torch.tensor([0.1, float("nan"), 0.3]), 0.5, r"1 of 3 scores are not finite \(first index 1\)"),
        (torch.ones(2, 2), 0.5, "scores must be a 1-D floating-point tensor"),
    ],
)
def test_bad_keep_inputs_are_named(scores, keep, message):
    with pytest.raises(ValueError, match=message):
        keep_mask(scores, keep)
    with pytest.raises(ValueError, match=message):
        score_threshold(scores, keep)


def test_unknown_score_or_loss_and_a_short_fetch_are_refused():
    emb = make_embeddings(4)
    with pytest.raises(ValueError, match=r"score must be one of \('similarity', 'loss'\), got 'cosine'"):
        reference_scores(in_memory(emb), 4, score="cosine")
    with pytest.raises(ValueError, match="loss must be one of"):
        reference_scores(in_memory(emb), 4, score="loss", loss="hinge")
    with pytest.raises(ValueError, match="fetch returned 1 pairs for 4 indices"):
        reference_scores(lambda idx: emb.take(idx[:1]), 4)
