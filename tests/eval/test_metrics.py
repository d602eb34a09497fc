"""Eval metrics on constructed features whose answers are known."""

import pytest
import torch
import torch.nn.functional as F

from jestclip.eval import (
    balanced_accuracy,
    fewshot_linear_probe,
    fewshot_split,
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
