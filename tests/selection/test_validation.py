"""Bad input gets a ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch

from jestclip.selection import (
    CandidateGroups,
    Embeddings,
    batch_score,
    conditional_scores,
    independent_select,
    joint_select,
)

from .helpers import gen, learner_and_reference, make_embeddings


@pytest.fixture
def models():
    return learner_and_reference(20, dtype=torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(size=0), "size must be an int in \\[1, B=20\\], got 0"),
        (dict(size=21), "size must be an int in \\[1, B=20\\], got 21"),
        (dict(size=2.5), "size must be an int"),
        (dict(size=True), "size must be an int"),
        (dict(size=8, n_chunks=0), "n_chunks must be an int in \\[1, size=8\\], got 0"),
        (dict(size=8, n_chunks=9), "n_chunks must be an int in \\[1, size=8\\], got 9"),
        (dict(size=8, n_chunks=2, gain=float("nan")), "gain must be finite"),
        (dict(size=8, n_chunks=2, gain=-1.0), "gain must be finite and >= 0"),
        (dict(size=8, n_chunks=2, scoring="learnable"), "scoring must be one of"),
        (dict(size=8, n_chunks=2, loss="hinge"), "loss must be one of"),
        (dict(size=8, n_chunks=2, generator=0), "generator must be a torch.Generator"),
        (dict(size=8, n_chunks=2, groups=(torch.arange(20) % 2, [4, 3])), "quotas sum to 7 but size is 8"),
        (dict(size=8, n_chunks=2, groups=(torch.arange(19) % 2, [4, 4])), "19 entries but there are 20"),
        (dict(size=8, n_chunks=2, groups=(torch.arange(20) % 3, [4, 4])), "must lie in \\[0, 2\\)"),
        (
            dict(size=8, n_chunks=2, groups=((torch.arange(20) > 16).long(), [4, 4])),
            "group 1 has quota 4 but only 3",
        ),
        (dict(size=8, n_chunks=2, groups=(torch.arange(20) % 2, [9, -1])), "non-negative"),
    ],
)
def test_joint_select_rejects_bad_arguments(models, kwargs, message):
    learner, reference = models
    with pytest.raises(ValueError, match=message):
        joint_select(learner, reference, **kwargs)


def test_missing_model_for_scoring(models):
    learner, reference = models
    with pytest.raises(ValueError, match="scoring='learnability' needs reference embeddings"):
        joint_select(learner, None, size=4, n_chunks=2)
    with pytest.raises(ValueError, match="scoring='hard_learner' needs learner embeddings"):
        joint_select(None, reference, size=4, n_chunks=2, scoring="hard_learner")
    with pytest.raises(ValueError, match="learner must be an Embeddings"):
        joint_select(learner.image, reference, size=4, n_chunks=2)


def test_mismatched_candidate_counts(models):
    learner, _ = models
    other = make_embeddings(21, seed=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="reference has 21 candidates but learner has 20"):
        joint_select(learner, other, size=4, n_chunks=2)
    with pytest.raises(ValueError, match="reference has 21 candidates"):
        conditional_scores(learner, other, torch.tensor([0]))


@pytest.mark.parametrize(
    ("image", "text", "scale", "bias", "message"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), 1.0, 0.0, "must have the same shape"),
        (torch.zeros(4), torch.zeros(4), 1.0, 0.0, "must have shape \\[B, D\\]"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), 1.0, 0.0, "floating point"),
        (torch.zeros(4, 3), torch.zeros(4, 3), float("inf"), 0.0, "Embeddings.scale must be finite"),
        (torch.zeros(4, 3), torch.zeros(4, 3), 1.0, float("nan"), "Embeddings.bias must be finite"),
        (torch.zeros(4, 3), torch.zeros(4, 3), -2.3, 0.0, "Embeddings.scale must be > 0"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(2), 0.0, "Embeddings.scale must be a scalar"),
        ([[0.0]], torch.zeros(1, 1), 1.0, 0.0, "Embeddings.image must be a torch.Tensor"),
    ],
)
def test_embeddings_validate(image, text, scale, bias, message):
    with pytest.raises(ValueError, match=message):
        Embeddings(image, text, scale, bias)


def test_embeddings_accept_scalar_tensors():
    e = Embeddings(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(10.0), torch.tensor([-10.0]))
    assert e.scale == 10.0 and e.bias == -10.0


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.tensor([0, 20]), "must lie in \\[0, 20\\)"),
        (torch.tensor([-1]), "must lie in \\[0, 20\\)"),
        (torch.tensor([1, 1]), "duplicate"),
        (torch.tensor([[1]]), "1-D integer tensor"),
        (torch.tensor([1.0]), "1-D integer tensor"),
    ],
)
def test_index_arguments_are_checked(models, indices, message):
    learner, reference = models
    with pytest.raises(ValueError, match="selected " + message if "lie" in message else message):
        conditional_scores(learner, reference, indices)
    with pytest.raises(ValueError, match=message):
        batch_score(learner, reference, indices)


def test_batch_score_of_nothing_is_an_error(models):
    with pytest.raises(ValueError, match="at least one candidate"):
        batch_score(*models, torch.zeros(0, dtype=torch.long))


def test_independent_select_rejects_bad_arguments(models):
    learner, reference = models
    with pytest.raises(ValueError, match="method must be one of"):
        independent_select(learner, reference, size=3, method="greedy")
    with pytest.raises(ValueError, match="context must be one of"):
        independent_select(learner, reference, size=3, context="batch")
    with pytest.raises(ValueError, match="size must be an int in \\[1, B=20\\]"):
        independent_select(learner, reference, size=30)


def test_candidate_groups_from_tensor_quotas():
    groups = CandidateGroups(torch.tensor([0, 1, 1]), torch.tensor([1, 1]))
    assert groups.quotas == (1, 1)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        CandidateGroups(torch.tensor([0.0, 1.0]), [1, 1])


def test_numpy_integers_are_accepted(models):
    import numpy as np

    idx = joint_select(*models, size=np.int64(6), n_chunks=np.int32(2), generator=gen(0))
    assert idx.numel() == 6


def test_valid_call_after_errors_still_works(models):
    # errors are raised before any state is built; a good call afterwards is unaffected
    learner, reference = models
    idx = joint_select(learner, reference, size=8, n_chunks=2, generator=gen(0))
    assert idx.unique().numel() == 8
