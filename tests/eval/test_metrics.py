"""Eval metrics on constructed features whose answers are known."""

import pytest
import torch
import torch.nn.functional as F

from jestclip.eval import (
    balanced_accuracy,
    fewshot_linear_probe,
    fewshot_split,
    galleries,
    gallery_recall,
    retrieval_recall,
    top1_accuracy,
    zeroshot_top1,
)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_perfect_retrieval_recalls_everything():
    feats = unit(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)))
    recall = retrieval_recall(feats, feats, torch.arange(300), block=64)
    assert recall == {"i2t_r@1": 1.0, "i2t_r@5": 1.0, "t2i_r@1": 1.0, "t2i_r@5": 1.0}


def test_random_retrieval_is_at_chance():
    g = torch.Generator().manual_seed(1)
    n = 2000
    recall = retrieval_recall(
        unit(torch.randn(n, 64, generator=g)),
        unit(torch.randn(n, 64, generator=g)),
        torch.arange(n),
        block=300,
    )
    # hits are Binomial(n, k / n): mean k, sd ~ sqrt(k)
    assert recall["i2t_r@1"] * n <= 6 and recall["t2i_r@1"] * n <= 6
    assert 0 < recall["i2t_r@5"] * n <= 14 and 0 < recall["t2i_r@5"] * n <= 14


def test_same_concept_counts_as_a_match():
    # pair i's text is another image of its concept: exact-pair R@1 would be 0, concept R@1 is 1
    image = unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)))
    text = image[[1, 2, 3, 0, 5, 6, 7, 4]]
    concepts = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert retrieval_recall(image, text, concepts)["i2t_r@1"] == 1.0
    assert retrieval_recall(image, text, torch.arange(8))["i2t_r@1"] == 0.0


def test_zeroshot_top1_known_answer():
    classes = torch.eye(4)  # class c is axis c; weights [D, C]
    images = unit(torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 1.0, 0.2], [0, 1.0, 0.9, 0], [0.2, 0, 0, 1.0]]))
    assert zeroshot_top1(images, classes, torch.tensor([0, 2, 1, 3])) == 1.0
    assert zeroshot_top1(images, classes, torch.tensor([0, 2, 2, 0])) == 0.5
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        zeroshot_top1(images, classes, torch.tensor([0, 2, 2, 4]))
    with pytest.raises(ValueError, match="feature dim 4 != classifier dim 3"):
        zeroshot_top1(images, torch.eye(3), torch.tensor([0, 1, 2, 0]))


def test_fewshot_split_takes_shots_per_class_and_leaves_small_classes_out():
    labels = torch.tensor([0] * 15 + [1] * 10 + [2] * 11 + [7] * 3)
    train, test = fewshot_split(labels, shots=10, seed=3)
    assert sorted(labels[train].tolist()) == [0] * 10 + [2] * 10
    assert sorted(labels[test].tolist()) == [0] * 5 + [2]
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(fewshot_split(labels, shots=10, seed=3)[0], train)  # seeded
    with pytest.raises(ValueError, match="no class has more than 20 examples"):
        fewshot_split(labels, shots=20)


def test_fewshot_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(4)
    centres = unit(torch.randn(5, 32, generator=g)) * 3
    labels = torch.arange(5).repeat_interleave(40)
    feats = centres[labels] + 0.3 * torch.randn(200, 32, generator=g)
    train, test = fewshot_split(labels, shots=10)
    assert fewshot_linear_probe(feats[train], labels[train], feats[test], labels[test]) == 1.0
    noise = torch.randn(200, 32, generator=g)
    assert fewshot_linear_probe(noise[train], labels[train], noise[test], labels[test]) < 0.45  # chance 0.2
    with pytest.raises(ValueError, match=r"test labels \[9\] do not occur"):
        fewshot_linear_probe(feats[train], labels[train], feats[:1], torch.tensor([9]))


def test_balanced_accuracy_does_not_reward_predicting_the_largest_class():
    # 27% of a suite in one class (OpenClipart's "stars"): always answering it is 27% top-1, 1/C balanced
    labels = torch.tensor([0] * 27 + [1] * 25 + [2] * 25 + [3] * 23)
    always_zero = torch.zeros_like(labels)
    assert top1_accuracy(always_zero, labels) == pytest.approx(0.27)
    assert balanced_accuracy(always_zero, labels) == pytest.approx(1 / 4)
    assert balanced_accuracy(labels, labels) == 1.0
    # one of two classes fully right, the other half right: (1 + 0.5) / 2, whatever the class sizes
    labels = torch.tensor([0] * 90 + [1] * 10)
    predictions = torch.tensor([0] * 90 + [1] * 5 + [0] * 5)
    assert balanced_accuracy(predictions, labels) == pytest.approx(0.75)
    assert top1_accuracy(predictions, labels) == pytest.approx(0.95)


def test_galleries_are_disjoint_seeded_slices_of_one_permutation():
    groups = galleries(250, 100, seed=3)
    assert groups.shape == (2, 100)
    assert torch.equal(
        groups.flatten(), torch.randperm(250, generator=torch.Generator().manual_seed(3))[:200]
    )
    assert not torch.equal(groups, galleries(250, 100, seed=4))
    assert galleries(98, 100).shape == (1, 98)  # fewer pairs than a gallery: one gallery of all of them
    with pytest.raises(ValueError, match="need n >= 1 and size >= 1, got n=0"):
        galleries(0, 100)


def test_gallery_recall_scores_each_query_against_its_own_gallery_only():
    g = torch.Generator().manual_seed(5)
    image, text = unit(torch.randn(230, 16, generator=g)), unit(torch.randn(230, 16, generator=g))
    concepts = torch.arange(230)
    # a gallery of one pair always retrieves its own match
    assert gallery_recall(image, text, concepts, size=1) == {
        k: 1.0 for k in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
    }
    # a gallery larger than the suite is the whole suite
    assert gallery_recall(image, text, concepts, size=500) == retrieval_recall(image, text, concepts)
    # two galleries of 100 (30 pairs left out): the mean of their own recalls
    got = gallery_recall(image, text, concepts, size=100, seed=7)
    each = [retrieval_recall(image[i], text[i], concepts[i]) for i in galleries(230, 100, seed=7)]
    assert got == pytest.approx({k: (each[0][k] + each[1][k]) / 2 for k in got}, abs=1e-12)


def test_a_confuser_in_another_gallery_does_not_count():
    # image 0's best text in the whole suite is text 2 (identical direction); its own text is second best
    e = torch.eye(4)
    image = torch.stack([e[0], e[1], e[0], e[3]])
    text = torch.stack([unit(0.8 * e[0] + 0.6 * e[2]), e[1], e[0], e[3]])
    concepts = torch.arange(4)
    assert retrieval_recall(image, text, concepts)["i2t_r@1"] == 0.75  # query 0 retrieves text 2
    apart = next(s for s in range(100) if not any({0, 2} <= set(g.tolist()) for g in galleries(4, 2, seed=s)))
    together = next(s for s in range(100) if any({0, 2} <= set(g.tolist()) for g in galleries(4, 2, seed=s)))
    assert gallery_recall(image, text, concepts, size=2, seed=apart)["i2t_r@1"] == 1.0
    assert gallery_recall(image, text, concepts, size=2, seed=together)["i2t_r@1"] == 0.75
