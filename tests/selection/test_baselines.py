"""Independent prioritisation and the brute-force Gibbs diagnostic."""

from __future__ import annotations

import pytest
import torch

from jestclip.selection import (
    LOSSES,
    SCORINGS,
    batch_score,
    conditional_scores,
    gibbs_select,
    independent_scores,
    independent_select,
    joint_select,
    pair_score_matrix,
)
from jestclip.selection.dense import logit_matrix

from .helpers import gen, learner_and_reference


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("scoring", SCORINGS)
def test_unconditional_context_is_the_empty_set_conditional(loss, scoring):
    learner, reference = learner_and_reference(30)
    expected = conditional_scores(
        learner, reference, torch.zeros(0, dtype=torch.long), scoring=scoring, loss=loss
    )
    got = independent_scores(learner, reference, scoring=scoring, loss=loss, context="unconditional")
    torch.testing.assert_close(got, expected)


def test_superbatch_context_sigmoid_is_equation_2_row_sums():
    learner, reference = learner_and_reference(30)
    expected = pair_score_matrix(learner, reference).sum(dim=1)  # l_kk + sum_{j != k} l_kj, per model
    got = independent_scores(learner, reference, loss="sigmoid", context="superbatch")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)


def test_superbatch_context_softmax_is_equation_1():
    learner, reference = learner_and_reference(30)

    def eq1(emb):
        logits = logit_matrix(emb, with_bias=False)
        i2t = -torch.log_softmax(logits, dim=1).diagonal()
        t2i = -torch.log_softmax(logits, dim=0).diagonal()
        return 0.5 * (i2t + t2i)

    got = independent_scores(learner, reference, loss="softmax", context="superbatch")
    torch.testing.assert_close(got, eq1(learner) - eq1(reference), rtol=1e-12, atol=1e-10)


def test_superbatch_context_ignores_non_finite_candidates():
    learner, reference = learner_and_reference(30)
    image = learner.image.clone()
    image[4] = float("nan")
    broken = type(learner)(image, learner.text, learner.scale, learner.bias)
    got = independent_scores(broken, reference, context="superbatch")
    keep = torch.arange(30) != 4
    clean = independent_scores(learner.take(keep), reference.take(keep), context="superbatch")
    assert got[4] == float("-inf")
    torch.testing.assert_close(got[keep], clean)


@pytest.mark.parametrize("context", ["unconditional", "superbatch"])
def test_topk_takes_the_best_scores(context):
    learner, reference = learner_and_reference(40)
    scores = independent_scores(learner, reference, context=context)
    idx = independent_select(learner, reference, size=7, context=context, method="topk")
    assert idx.tolist() == torch.topk(scores, 7).indices.tolist()


def test_sampled_independent_selection_is_distinct_and_deterministic():
    learner, reference = learner_and_reference(40)
    a = independent_select(learner, reference, size=20, gain=1.0, generator=gen(1))
    b = independent_select(learner, reference, size=20, gain=1.0, generator=gen(1))
    assert torch.equal(a, b) and a.unique().numel() == 20
    uniform = independent_select(learner, reference, size=40, gain=0.0, generator=gen(1))
    assert sorted(uniform.tolist()) == list(range(40))


def test_gibbs_climbs_and_matches_joint_selection():
    """Figure 2 (middle): JEST's 16 chunks reach the learnability that Gibbs needs many swaps for."""
    learner, reference = learner_and_reference(120, dtype=torch.float32)
    trace = gibbs_select(learner, reference, size=24, n_steps=600, gain=1.0, generator=gen(0))
    assert trace.scores.shape == (601,)
    assert trace.indices.unique().numel() == 24
    assert 0 < trace.accepted < 600
    assert float(trace.scores[-1]) > float(trace.scores[0]) + 1.0
    torch.testing.assert_close(
        trace.scores[-1], batch_score(learner, reference, trace.indices).double(), rtol=1e-6, atol=1e-6
    )
    jest = [
        float(
            batch_score(
                learner, reference, joint_select(learner, reference, size=24, gain=1.0, generator=gen(s))
            )
        )
        for s in range(5)
    ]
    assert sum(jest) / 5 > float(trace.scores[0])


def test_gibbs_with_zero_steps_returns_init():
    learner, reference = learner_and_reference(20)
    init = torch.arange(5)
    trace = gibbs_select(learner, reference, size=5, n_steps=0, init=init)
    assert torch.equal(trace.indices, init) and trace.scores.shape == (1,)
    with pytest.raises(ValueError, match="init has 4 indices but size is 5"):
        gibbs_select(learner, reference, size=5, n_steps=0, init=torch.arange(4))
