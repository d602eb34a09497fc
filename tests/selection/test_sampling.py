"""Sizes, uniqueness, determinism, groups and the sampling distribution of joint_select."""

from __future__ import annotations

import math
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from jestclip.selection import (
    CandidateGroups,
    LocalExchange,
    batch_score,
    chunk_sizes,
    conditional_scores,
    group_chunk_counts,
    independent_select,
    joint_select,
)

from .helpers import gen, learner_and_reference, make_embeddings

# chi-square critical values at p = 0.001
CHI2_0001 = {4: 18.467, 19: 43.820}


def test_chunk_sizes_are_exact_where_float_truncation_loses_examples():
    # The paper's int(B * (1 - f) / n_chunks) gives 16 * 2047 = 32,752 for B = 163,840, f = 0.8.
    sizes = chunk_sizes(32_768, 16)
    assert sum(sizes) == 32_768 and set(sizes) == {2048}
    sizes = chunk_sizes(32_771, 16)
    assert sum(sizes) == 32_771 and max(sizes) - min(sizes) == 1
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(5, 5) == [1] * 5


@pytest.mark.parametrize(("size", "n_chunks"), [(1, 1), (7, 3), (30, 16), (64, 1), (64, 64)])
def test_selection_has_exact_size_and_distinct_indices(size, n_chunks):
    learner, reference = learner_and_reference(64, dtype=torch.float32)
    idx = joint_select(learner, reference, size=size, n_chunks=n_chunks, generator=gen(0))
    assert idx.dtype == torch.long and idx.shape == (size,)
    assert idx.unique().numel() == size
    assert 0 <= int(idx.min()) and int(idx.max()) < 64


def test_selection_is_deterministic_for_a_generator_and_varies_across_seeds():
    learner, reference = learner_and_reference(100, dtype=torch.float32)
    kwargs = dict(size=30, n_chunks=4, gain=1.0)
    a = joint_select(learner, reference, generator=gen(7), **kwargs)
    b = joint_select(learner, reference, generator=gen(7), **kwargs)
    c = joint_select(learner, reference, generator=gen(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_large_gain_does_not_overflow():
    # exp(gain * c) overflows float64 at c ~ 7 with gain 100; the log-space sampler must not care.
    learner, reference = learner_and_reference(200, dtype=torch.float32)
    idx = joint_select(learner, reference, size=150, n_chunks=2, gain=1e6, generator=gen(0))
    assert idx.unique().numel() == 150


def test_greedy_limit_picks_the_best_first_chunk():
    learner, reference = learner_and_reference(50)
    c0 = conditional_scores(learner, reference, torch.zeros(0, dtype=torch.long))
    idx = joint_select(learner, reference, size=5, n_chunks=1, gain=1e9, generator=gen(0))
    assert idx.tolist() == torch.topk(c0, 5).indices.tolist()


def _probabilities(learner, reference, gain):
    c0 = conditional_scores(learner, reference, torch.zeros(0, dtype=torch.long))
    return torch.softmax(gain * c0, dim=0).tolist()


def test_single_draws_follow_the_softmax_of_the_scores():
    learner, reference = learner_and_reference(5)
    gain, n = 0.5, 8_000
    p = _probabilities(learner, reference, gain)
    assert max(p) < 0.9, "fixture too peaked for a useful test"
    g = gen(123)
    counts = Counter(
        int(joint_select(learner, reference, size=1, n_chunks=1, gain=gain, generator=g)) for _ in range(n)
    )
    chi2 = sum((counts[k] - n * p[k]) ** 2 / (n * p[k]) for k in range(5))
    assert chi2 < CHI2_0001[4], (counts, p)


def test_ordered_pairs_follow_plackett_luce():
    """Two draws without replacement: P(i then j) = p_i * p_j / (1 - p_i)."""
    learner, reference = learner_and_reference(5)
    gain, n = 0.5, 10_000
    p = _probabilities(learner, reference, gain)
    g = gen(321)
    counts = Counter(
        tuple(joint_select(learner, reference, size=2, n_chunks=1, gain=gain, generator=g).tolist())
        for _ in range(n)
    )
    expected = {(i, j): p[i] * p[j] / (1 - p[i]) for i in range(5) for j in range(5) if i != j}
    assert math.isclose(sum(expected.values()), 1.0)
    assert set(counts) <= set(expected)
    chi2 = sum((counts[k] - n * e) ** 2 / (n * e) for k, e in expected.items())
    assert chi2 < CHI2_0001[19], chi2


def test_second_chunk_is_drawn_from_the_conditional_scores():
    """With two chunks of one, the second draw follows softmax(gain * c_k({first}))."""
    learner, reference = learner_and_reference(5)
    gain, n = 0.5, 8_000
    g = gen(5)
    pairs = [
        tuple(joint_select(learner, reference, size=2, n_chunks=2, gain=gain, generator=g).tolist())
        for _ in range(n)
    ]
    first = Counter(a for a, _ in pairs).most_common(1)[0][0]
    seconds = Counter(b for a, b in pairs if a == first)
    m = sum(seconds.values())
    c = conditional_scores(learner, reference, torch.tensor([first]))
    p = torch.softmax(gain * c, dim=0).tolist()
    assert p[first] == 0.0
    chi2 = sum((seconds[k] - m * p[k]) ** 2 / (m * p[k]) for k in range(5) if k != first)
    assert chi2 < 16.266, (seconds, p)  # df = 3, p = 0.001


def test_learnability_selection_beats_random_subsets():
    """The method's point: jointly selected sub-batches are more learnable than IID ones."""
    learner, reference = learner_and_reference(400, dtype=torch.float32)
    jest = [
        float(batch_score(learner, reference, joint_select(learner, reference, size=80, generator=gen(s))))
        for s in range(5)
    ]
    iid = [
        float(batch_score(learner, reference, torch.randperm(400, generator=gen(s))[:80])) for s in range(5)
    ]
    assert min(jest) > max(iid)


def test_more_chunks_give_more_learnable_batches():
    """Figure 2 (middle): conditioning on earlier chunks finds batches that independent draws miss."""
    learner, reference = learner_and_reference(300, dtype=torch.float32)

    def mean_score(n_chunks):
        return (
            sum(
                float(
                    batch_score(
                        learner,
                        reference,
                        joint_select(
                            learner, reference, size=60, n_chunks=n_chunks, gain=1.0, generator=gen(s)
                        ),
                    )
                )
                for s in range(8)
            )
            / 8
        )

    assert mean_score(16) > mean_score(1)


def test_groups_respect_quotas_in_every_chunk():
    learner, reference = learner_and_reference(120, dtype=torch.float32)
    ids = torch.arange(120) % 4  # interleaved, as a rank id per candidate
    quotas = [10, 10, 5, 5]
    idx = joint_select(learner, reference, size=30, n_chunks=4, groups=(ids, quotas), generator=gen(0))
    assert idx.unique().numel() == 30
    assert torch.bincount(ids[idx], minlength=4).tolist() == quotas
    expected = group_chunk_counts(quotas, chunk_sizes(30, 4))
    start = 0
    for size, counts in zip(chunk_sizes(30, 4), expected, strict=True):
        assert torch.bincount(ids[idx[start : start + size]], minlength=4).tolist() == counts
        start += size


def test_group_chunk_counts_are_balanced():
    counts = group_chunk_counts([8, 8, 8, 8], chunk_sizes(32, 8))
    assert counts == [[1, 1, 1, 1]] * 8
    counts = group_chunk_counts([6, 0, 3], [3, 3, 3])
    assert counts == [[2, 0, 1]] * 3
    counts = torch.tensor(group_chunk_counts([7, 5, 1], chunk_sizes(13, 4)))
    assert counts.sum(0).tolist() == [7, 5, 1]
    assert counts.sum(1).tolist() == chunk_sizes(13, 4)


def test_non_finite_candidates_are_never_selected_and_counted():
    learner, reference = learner_and_reference(40, dtype=torch.float32)
    image = learner.image.clone()
    image[[3, 5]] = float("nan")
    text = reference.text.clone()
    text[7, 0] = float("inf")
    learner = type(learner)(image, learner.text, learner.scale, learner.bias)
    reference = type(reference)(reference.image, text, reference.scale, reference.bias)
    with pytest.warns(RuntimeWarning, match=r"3 of 40 candidates have non-finite embeddings"):
        idx = joint_select(learner, reference, size=37, n_chunks=4, gain=1.0, generator=gen(0))
    assert not {3, 5, 7} & set(idx.tolist())
    assert idx.unique().numel() == 37
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="only 37 of 40 candidates are usable"):
        joint_select(learner, reference, size=38, generator=gen(0))


def test_hard_learner_needs_no_reference_and_easy_reference_no_learner():
    learner, reference = learner_and_reference(30, dtype=torch.float32)
    a = joint_select(learner, None, size=10, n_chunks=2, scoring="hard_learner", generator=gen(0))
    b = joint_select(None, reference, size=10, n_chunks=2, scoring="easy_reference", generator=gen(0))
    c = joint_select(learner, reference, size=10, n_chunks=2, scoring="easy_reference", generator=gen(0))
    assert a.numel() == b.numel() == 10
    assert torch.equal(b, c)  # the learner is ignored by easy_reference


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_low_precision_inputs_accumulate_in_float32(loss):
    learner32, reference32 = learner_and_reference(80, dim=16, dtype=torch.float32)
    learner = make_embeddings(80, 16, seed=0, scale=10.0, bias=-10.0, noise=1.2, dtype=torch.bfloat16)
    reference = make_embeddings(80, 20, seed=1000, scale=14.0, bias=-6.0, noise=0.5, dtype=torch.float16)
    selected = torch.arange(20)
    low = conditional_scores(learner, reference, selected, loss=loss)
    high = conditional_scores(learner32, reference32, selected, loss=loss)
    assert low.dtype == torch.float32
    rest = slice(20, None)
    # bf16 rounding of the inputs moves each logit by ~scale * 2^-8; sums stay close in relative terms
    torch.testing.assert_close(low[rest], high[rest], rtol=0.05, atol=0.5)
    idx = joint_select(learner, reference, size=30, loss=loss, generator=gen(0))
    assert idx.unique().numel() == 30


def test_groups_and_an_exchange_are_exclusive():
    learner, reference = learner_and_reference(20, dtype=torch.float32)
    groups = (torch.arange(20) % 2, [2, 2])
    explicit = joint_select(
        learner, reference, size=4, n_chunks=2, exchange=LocalExchange(groups), generator=gen(3)
    )
    assert torch.equal(
        explicit, joint_select(learner, reference, size=4, n_chunks=2, groups=groups, generator=gen(3))
    )
    with pytest.raises(ValueError, match="pass groups or exchange, not both"):
        joint_select(learner, reference, size=4, groups=groups, exchange=LocalExchange(), generator=gen(0))


def _thread_exchanges(world: int):
    """``world`` DistributedExchanges for threads of one process: all-gather through a shared board."""
    from jestclip.selection.sampling import DistributedExchange

    slots: list[torch.Tensor | None] = [None] * world
    barrier = threading.Barrier(world, timeout=60)

    class ThreadExchange(DistributedExchange):
        def __init__(self, rank: int) -> None:
            self.group, self.world, self.rank = None, world, rank

        def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
            slots[self.rank] = tensor.clone()
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()
            return out

    return [ThreadExchange(rank) for rank in range(world)]


def _on_threads(world: int, run) -> list:
    exchanges = _thread_exchanges(world)
    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(lambda rank: run(rank, exchanges[rank]), range(world)))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_a_sharded_exchange_draws_what_one_process_draws_with_groups(loss):
    world, n, size = 3, 20, 12
    learner, reference = learner_and_reference(world * n, dtype=torch.float32)
    kwargs = dict(size=size, n_chunks=4, loss=loss, gain=5.0)

    def joint(rank, exchange):
        rows = torch.arange(rank * n, (rank + 1) * n)
        return joint_select(
            learner.take(rows), reference.take(rows), exchange=exchange, generator=gen(5), **kwargs
        )

    groups = CandidateGroups(torch.arange(world * n) // n, [size // world] * world)
    single = joint_select(learner, reference, groups=groups, generator=gen(5), **kwargs)
    assert all(torch.equal(chosen, single) for chosen in _on_threads(world, joint))

    def independent(rank, exchange):
        rows = torch.arange(rank * n, (rank + 1) * n)
        shard = (learner.take(rows), reference.take(rows))
        return independent_select(*shard, size=size, loss=loss, gain=5.0, exchange=exchange, generator=gen(5))

    grouped = LocalExchange(groups)
    single = independent_select(
        learner, reference, size=size, loss=loss, gain=5.0, exchange=grouped, generator=gen(5)
    )
    for rank, local in enumerate(_on_threads(world, independent)):
        assert torch.equal(local + rank * n, single[single // n == rank])


def test_a_sharded_exchange_returns_rows_in_chunk_order():
    world, n = 3, 5
    chunk = torch.tensor([7, 0, 14, 3, 8, 1, 9])  # uneven: 3, 2 and 2 picks per rank, interleaved

    def run(rank, exchange):
        own = torch.arange(rank * n, (rank + 1) * n)
        return exchange.rows(chunk, [own, own[:, None].double().expand(n, 2)])

    for ids, wide in _on_threads(world, run):
        assert torch.equal(ids, chunk) and torch.equal(wide, chunk[:, None].double().expand(-1, 2))


def test_a_sharded_exchange_rejects_unequal_shards():
    learner, reference = learner_and_reference(41, dtype=torch.float32)

    def run(rank, exchange):
        rows = torch.arange(0, 20) if rank == 0 else torch.arange(20, 41)
        with pytest.raises(
            ValueError, match="every rank must hold the same number of candidates, got \\[20, 21\\]"
        ):
            joint_select(
                learner.take(rows), reference.take(rows), size=4, exchange=exchange, generator=gen(0)
            )

    _on_threads(2, run)
