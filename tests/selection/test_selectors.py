"""The selector registry: each selector runs its local form on one process, with the settings it names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jestclip.selection import SELECTORS, get_selector, independent_select, joint_select

from .helpers import gen, learner_and_reference

SETTINGS = SimpleNamespace(n_chunks=64, independent_context="superbatch", independent_method="topk")
COMMON = dict(size=6, scoring="learnability", loss="sigmoid", gain=3.0)


def test_each_selector_is_registered_under_its_name_and_names_its_settings():
    assert set(SELECTORS) == {"joint", "independent"}
    for name, selector in SELECTORS.items():
        assert selector.name == name and get_selector(name) is selector
        assert all(hasattr(SETTINGS, field) for field in selector.settings)
    assert SELECTORS["joint"].settings == ("n_chunks",)
    assert SELECTORS["independent"].settings == ("independent_context", "independent_method")
    with pytest.raises(ValueError, match=r"selector must be one of \('joint', 'independent'\), got 'greedy'"):
        get_selector("greedy")


def test_on_one_process_a_selector_is_its_local_form_with_its_settings():
    learner, reference = learner_and_reference(24)
    joint = SELECTORS["joint"].select(learner, reference, SETTINGS, generator=gen(5), **COMMON)
    # n_chunks is capped at size, as joint_select requires
    assert torch.equal(joint, joint_select(learner, reference, n_chunks=6, generator=gen(5), **COMMON))
    independent = SELECTORS["independent"].select(learner, reference, SETTINGS, generator=gen(5), **COMMON)
    expected = independent_select(
        learner, reference, context="superbatch", method="topk", generator=gen(5), **COMMON
    )
    assert torch.equal(independent, expected)


def test_distributed_independent_selection_refuses_the_superbatch_context():
    """Each rank holds only its shard, so a per-example loss against the whole super-batch is refused."""
    learner, reference = learner_and_reference(24)
    select = SELECTORS["independent"].select
    with pytest.raises(ValueError, match="needs independent_context='unconditional'"):
        select(learner, reference, SETTINGS, generator=gen(5), world_size=2, **COMMON)
