"""The tiled engine equals the dense O(B²) oracle (float64), and both equal the written formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jestclip.selection import (
    LOSSES,
    SCORINGS,
    CandidateGroups,
    ConditionalScores,
    batch_score,
    conditional_scores,
    contrastive,
    dense_batch_score,
    dense_conditional_scores,
    dense_joint_select,
    joint_select,
    pair_score_matrix,
)

from .helpers import gen, learner_and_reference

ALL = [(loss, scoring) for loss in LOSSES for scoring in SCORINGS]


@pytest.mark.parametrize(("loss", "scoring"), ALL)
@pytest.mark.parametrize("n_selected", [0, 1, 5, 23])
def test_conditional_scores_match_dense(loss, scoring, n_selected):
    learner, reference = learner_and_reference(40)
    selected = torch.randperm(40, generator=gen(n_selected))[:n_selected]
    tiled = conditional_scores(learner, reference, selected, scoring=scoring, loss=loss)
    dense = dense_conditional_scores(learner, reference, selected, scoring=scoring, loss=loss)
    assert torch.equal(torch.isinf(tiled), torch.isinf(dense))
    assert torch.isinf(tiled[selected]).all()
    finite = torch.isfinite(dense)
    torch.testing.assert_close(tiled[finite], dense[finite], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(("loss", "scoring"), ALL)
def test_running_state_after_several_chunks_matches_dense(loss, scoring):
    learner, reference = learner_and_reference(60)
    order = torch.randperm(60, generator=gen(1))
    state = ConditionalScores.from_embeddings(learner, reference, scoring=scoring, loss=loss)
    for end in (7, 15, 16, 30, 41):  # uneven chunks, one of size 1
        start = state.n_absorbed
        state.absorb_indices(order[start:end])
        dense = dense_conditional_scores(learner, reference, order[:end], scoring=scoring, loss=loss)
        rest = order[end:]
        torch.testing.assert_close(state.conditional()[rest], dense[rest], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(("loss", "scoring"), ALL)
@pytest.mark.parametrize("size", [1, 2, 17, 50])
def test_batch_score_matches_dense(loss, scoring, size):
    learner, reference = learner_and_reference(50)
    indices = torch.randperm(50, generator=gen(size))[:size]
    tiled = batch_score(learner, reference, indices, scoring=scoring, loss=loss)
    dense = dense_batch_score(learner, reference, indices, scoring=scoring, loss=loss)
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-10)


def test_sigmoid_pair_losses_follow_the_written_formula():
    learner, reference = learner_and_reference(6)
    s = pair_score_matrix(learner, reference, scoring="learnability")
    for i in range(6):
        for j in range(6):
            terms = []
            for emb in (learner, reference):
                z = emb.scale * float(emb.image[i] @ emb.text[j]) + emb.bias
                terms.append(F.softplus(torch.tensor(-z if i == j else z, dtype=torch.float64)))
            assert float(s[i, j]) == pytest.approx(float(terms[0] - terms[1]), rel=1e-12)


def test_empty_set_scores_are_the_diagonal_terms():
    learner, reference = learner_and_reference(12)
    none = torch.zeros(0, dtype=torch.long)
    c_sig = conditional_scores(learner, reference, none, loss="sigmoid")
    torch.testing.assert_close(c_sig, pair_score_matrix(learner, reference).diagonal())
    c_soft = conditional_scores(learner, reference, none, loss="softmax")
    diag = {id(e): e.scale * (e.image * e.text).sum(1) for e in (learner, reference)}
    torch.testing.assert_close(c_soft, -diag[id(learner)] + diag[id(reference)])
    hard = conditional_scores(learner, None, none, scoring="hard_learner", loss="softmax")
    torch.testing.assert_close(hard, -diag[id(learner)])


@pytest.mark.parametrize("scoring", SCORINGS)
def test_sigmoid_conditional_is_the_increment_of_the_summed_batch_score(scoring):
    """|S+k| s(S+k) - |S| s(S) = c_k(S): joint sampling adds the batch score one conditional at a time."""
    loss = "sigmoid"
    learner, reference = learner_and_reference(30)
    selected = torch.tensor([4, 9, 17, 22, 3])
    c = conditional_scores(learner, reference, selected, scoring=scoring, loss=loss)
    base = len(selected) * batch_score(learner, reference, selected, scoring=scoring, loss=loss)
    for k in (0, 10, 29):
        grown = torch.cat([selected, torch.tensor([k])])
        total = len(grown) * batch_score(learner, reference, grown, scoring=scoring, loss=loss)
        assert float(total - base) == pytest.approx(float(c[k]), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize(("loss", "scoring"), ALL)
@pytest.mark.parametrize("gain", [0.0, 1.0, 100.0])
def test_tiled_selection_equals_dense_selection(loss, scoring, gain):
    learner, reference = learner_and_reference(64)
    kwargs = dict(size=24, n_chunks=5, scoring=scoring, loss=loss, gain=gain)
    tiled = joint_select(learner, reference, generator=gen(3), **kwargs)
    dense = dense_joint_select(learner, reference, generator=gen(3), **kwargs)
    assert torch.equal(tiled, dense)


@pytest.mark.parametrize("loss", LOSSES)
def test_tiled_selection_equals_dense_with_groups(loss):
    learner, reference = learner_and_reference(64)
    groups = CandidateGroups(torch.arange(64) // 16, [4, 4, 4, 4])
    kwargs = dict(size=16, n_chunks=4, loss=loss, gain=10.0, groups=groups)
    assert torch.equal(
        joint_select(learner, reference, generator=gen(9), **kwargs),
        dense_joint_select(learner, reference, generator=gen(9), **kwargs),
    )


def test_tiny_tiles_change_nothing(monkeypatch):
    """Forcing many row blocks per chunk (tiles of 64 elements) gives the same scores and selection."""
    learner, reference = learner_and_reference(48)
    kwargs = dict(size=20, n_chunks=3, gain=5.0)
    expected = joint_select(learner, reference, generator=gen(0), **kwargs)
    expected_scores = conditional_scores(learner, reference, expected[:10], loss="softmax")
    monkeypatch.setattr(contrastive, "MAX_TILE_ELEMENTS", 64)
    assert torch.equal(joint_select(learner, reference, generator=gen(0), **kwargs), expected)
    torch.testing.assert_close(
        conditional_scores(learner, reference, expected[:10], loss="softmax"), expected_scores
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_no_b_by_b_tensor_is_built(monkeypatch, loss):
    """Every matrix product is a [B, rows] tile with rows <= chunk size, never [B, B]."""
    learner, reference = learner_and_reference(200)
    shapes = []
    real_mm = torch.mm

    def recording_mm(a, b):
        out = real_mm(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", recording_mm)
    joint_select(learner, reference, size=40, n_chunks=4, loss=loss, generator=gen(0))
    assert shapes, "the engine no longer uses torch.mm; update this test"
    assert max(rows for _, rows in shapes) <= 10
    assert all(n == 200 for n, _ in shapes)
