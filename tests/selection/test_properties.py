"""Hypothesis property tests over shapes, sizes, chunks, groups and scorings."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jestclip.selection import (
    LOSSES,
    SCORINGS,
    CandidateGroups,
    batch_score,
    chunk_sizes,
    dense_batch_score,
    dense_joint_select,
    group_chunk_counts,
    joint_select,
)

from .helpers import gen, make_embeddings


@st.composite
def selection_problems(draw):
    n = draw(st.integers(1, 40))
    size = draw(st.integers(1, n))
    n_chunks = draw(st.integers(1, size))
    dims = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    scoring = draw(st.sampled_from(SCORINGS))
    loss = draw(st.sampled_from(LOSSES))
    gain = draw(st.sampled_from([0.0, 0.3, 5.0, 100.0]))
    seed = draw(st.integers(0, 2**16))
    n_groups = draw(st.integers(0, 3))
    groups = None
    if n_groups:
        ids = torch.tensor(draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)))
        available = torch.bincount(ids, minlength=n_groups).tolist()
        # split `size` into quotas no larger than what each group holds, if possible
        quotas, left = [], size
        for a in available:
            q = min(a, left)
            quotas.append(q)
            left -= q
        if left == 0:
            groups = CandidateGroups(ids, quotas)
    return n, size, n_chunks, dims, scoring, loss, gain, seed, groups


@settings(max_examples=150, deadline=None)
@given(selection_problems())
def test_tiled_selection_equals_dense_and_is_well_formed(problem):
    n, size, n_chunks, (d1, d2), scoring, loss, gain, seed, groups = problem
    learner = make_embeddings(n, d1, seed=seed, scale=8.0, bias=-4.0, noise=1.0)
    reference = make_embeddings(n, d2, seed=seed + 1, scale=12.0, bias=-8.0, noise=0.4)
    kwargs = dict(size=size, n_chunks=n_chunks, scoring=scoring, loss=loss, gain=gain, groups=groups)
    idx = joint_select(learner, reference, generator=gen(seed), **kwargs)
    assert idx.shape == (size,) and idx.unique().numel() == size
    assert 0 <= int(idx.min()) and int(idx.max()) < n
    if groups is not None:
        assert torch.bincount(groups.ids[idx], minlength=len(groups.quotas)).tolist() == list(groups.quotas)
    assert torch.equal(idx, dense_joint_select(learner, reference, generator=gen(seed), **kwargs))
    torch.testing.assert_close(
        batch_score(learner, reference, idx, scoring=scoring, loss=loss),
        dense_batch_score(learner, reference, idx, scoring=scoring, loss=loss),
        rtol=1e-10,
        atol=1e-10,
    )


@given(st.integers(1, 10**6), st.integers(1, 512))
def test_chunk_sizes_sum_exactly_and_are_balanced(size, n_chunks):
    if n_chunks > size:
        return
    sizes = chunk_sizes(size, n_chunks)
    assert len(sizes) == n_chunks and sum(sizes) == size and max(sizes) - min(sizes) <= 1


@settings(derandomize=True, max_examples=300)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=8), st.integers(1, 16))
def test_group_chunk_counts_are_exact_and_proportional(quotas, n_chunks):
    total = sum(quotas)
    if total < n_chunks:
        return
    sizes = chunk_sizes(total, n_chunks)
    counts = torch.tensor(group_chunk_counts(quotas, sizes))
    assert counts.sum(1).tolist() == sizes
    assert counts.sum(0).tolist() == quotas
    # after every chunk, each group has drawn about its proportional share
    drawn = counts.cumsum(0).double()
    target = torch.tensor(sizes).cumsum(0).double()[:, None] * torch.tensor(quotas).double() / total
    assert (drawn - target).abs().max() < 1.5
