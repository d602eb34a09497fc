"""Method descriptions: the facts each method states, and its FLOPs per step against appendix A.4."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from jestclip.models import ForwardFlops
from jestclip.selection import SCORINGS, SELECTORS
from jestclip.train import METHODS, Method, MethodConfig, TrainConfig, get_method
from jestclip.train.steps import (
    contrastive_learning_loss,
    learn_batch_step,
    select_and_learn_step,
    steered_learning_loss,
)

F = ForwardFlops(image=300, text=100)  # learner forward per example
FA = ForwardFlops(image=75, text=100)  # approximate learner (image tower at a quarter)
REF = ForwardFlops(image=600, text=200)
b, B = 1000, 5000  # filter ratio 0.8


def a4(method: str, scoring: str, fraction: float, reference: ForwardFlops | None) -> float:
    """Appendix A.4 written out per method, with jestclip's recomputed training forward."""
    if method in ("iid", "filter"):  # filter: its scoring pass is the reference cache's, paid once
        return 3 * F.total * b
    if method == "drrho":  # iid's step plus, when not cached, the reference's forward over the batch
        return 3 * F.total * b + (reference.total * b if reference is not None else 0.0)
    learner_scores = scoring != "easy_reference"
    ref = reference.total * B if reference is not None and scoring != "hard_learner" else 0.0
    if method in ("jest", "independent"):
        return 3 * F.total * b + (F.total * B if learner_scores else 0.0) + ref
    assert method == "flexi-jest"
    train = 3 * (fraction * FA.total + (1 - fraction) * F.total) * b
    return train + (FA.total * B if learner_scores else 0.0) + ref


@pytest.mark.parametrize(
    ("method", "scoring", "fraction", "reference"),
    list(itertools.product(METHODS, SCORINGS, (0.0, 0.25, 0.5, 1.0), (None, REF))),
)
def test_step_flops_follow_appendix_a4(method, scoring, fraction, reference):
    cfg = MethodConfig(method, batch_size=b, scoring=scoring, approx_fraction=fraction)
    desc = get_method(method)
    cost = desc.step_flops(cfg, super_batch=B, learner=F, approx_learner=FA, reference=reference)
    assert cost.total == pytest.approx(a4(method, scoring, fraction, reference))


def test_the_two_flop_bugs_stay_fixed():
    # flexi-jest's training FLOPs follow approx_fraction (they were always counted at 0.5)
    flexi = get_method("flexi-jest")
    quarter = flexi.step_flops(
        MethodConfig("flexi-jest", batch_size=b, approx_fraction=0.25),
        super_batch=B,
        learner=F,
        approx_learner=FA,
    )
    assert quarter.train == pytest.approx(3 * (0.25 * FA.total + 0.75 * F.total) * b)
    # easy_reference never runs the learner over the super-batch, so it is charged no scoring pass
    easy = get_method("jest").step_flops(
        MethodConfig("jest", batch_size=b, scoring="easy_reference"), super_batch=B, learner=F
    )
    assert easy.score == 0.0 and easy.total == pytest.approx(3 * F.total * b)


def test_descriptions_state_what_each_method_needs():
    assert set(METHODS) == {"iid", "filter", "jest", "independent", "flexi-jest", "drrho"}
    iid, jest, independent, flexi = (METHODS[m] for m in ("iid", "jest", "independent", "flexi-jest"))
    for m in (iid, METHODS["filter"]):
        assert not m.selects and m.step is learn_batch_step
        assert not m.needs_reference("learnability") and not m.scores_with_learner("learnability")
    assert METHODS["filter"].needs_keep_list and not any(
        m.needs_keep_list for m in METHODS.values() if m is not METHODS["filter"]
    )
    drrho = METHODS["drrho"]  # learns on the batch as drawn, with the reference's embeddings in its loss
    assert not drrho.selects and drrho.step is learn_batch_step
    assert drrho.learning_loss is steered_learning_loss
    for scoring in SCORINGS:  # the scoring rule is not used: the loss needs the reference all the same
        assert drrho.needs_reference(scoring) and not drrho.scores_with_learner(scoring)
    assert all(m.learning_loss is contrastive_learning_loss for m in METHODS.values() if m is not drrho)
    assert not any(m.reference_in_loss for m in METHODS.values() if m is not drrho)
    assert (jest.selector, independent.selector, flexi.selector) == ("joint", "independent", "joint")
    for m in (jest, independent, flexi):
        assert m.step is select_and_learn_step
        assert m.needs_reference("learnability") and m.needs_reference("easy_reference")
        assert not m.needs_reference("hard_learner")
        assert m.scores_with_learner("hard_learner") and not m.scores_with_learner("easy_reference")
    assert flexi.scoring_approx(MethodConfig("flexi-jest")) == "flexi"
    assert jest.scoring_approx(MethodConfig("jest")) is None
    assert jest.learned_approx_fraction(MethodConfig("jest", approx_fraction=0.7)) == 0.0
    assert iid.super_batch(64, 0.8) == 64 and jest.super_batch(64, 0.8) == 320
    assert drrho.super_batch(64, 0.8) == 64
    assert TrainConfig(method=MethodConfig("drrho", batch_size=32)).super_batch == 32
    with pytest.raises(ValueError, match=r"filter_ratio must be in \[0, 1\)"):
        jest.super_batch(64, 1.0)
    with pytest.raises(ValueError, match=r"method\.method = 'random' is not one of"):
        MethodConfig("random")
    assert TrainConfig(method=MethodConfig("iid", batch_size=32)).super_batch == 32


def test_a_method_names_a_registered_selector_and_its_settings_are_method_config_fields():
    """A selector reads its settings by name from the method's settings (``Selector.settings``): each is a
    ``MethodConfig`` field; a method naming no registered selector is refused when described."""
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    for selector in SELECTORS.values():
        assert set(selector.settings) <= fields, selector.name
    assert {m.selector for m in METHODS.values() if m.selects} <= set(SELECTORS)
    known = r"selector must be one of \('joint', 'independent'\) or None, got 'greedy'"
    with pytest.raises(ValueError, match=f"method 'greedy': {known}"):
        Method("greedy", "select greedily", select_and_learn_step, selector="greedy")
