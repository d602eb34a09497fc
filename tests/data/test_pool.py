"""The memory-resident pool: the stream's samples, skips and guarantees, served from memory."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from jestclip.data import SuperBatchStream
from jestclip.data import pool as pool_module
from jestclip.data.pool import MemoryPool, epoch_order, split_transform
from jestclip.data.stream import ResumableBatches
from jestclip.models import image_transform

from .test_loader import bad_sample_shards, make_shards, total_skips

TRANSFORM = image_transform("jest-micro")  # open_clip's: resize 32 bicubic, centre crop, ToTensor, Normalize


def pool_of(urls: list[str], batch_size: int, **kw) -> MemoryPool:
    stream = SuperBatchStream(urls, batch_size=batch_size, transform=kw.pop("transform", TRANSFORM), **kw)
    return MemoryPool.from_stream(stream)


def served(pool: MemoryPool, n: int, position: dict | None = None) -> list:
    batches = pool.batches(position)
    return [next(batches) for _ in range(n)]


def test_samples_equal_the_streams_bitwise(tmp_path):
    urls = bad_sample_shards(tmp_path)  # 21 readable samples among bad ones
    stream = SuperBatchStream(urls, batch_size=100, transform=TRANSFORM, shuffle_shards=False)
    (expected,) = list(stream)
    pool = pool_of(urls, 7)
    assert pool.keys == expected.keys and len(pool) == 21
    assert pool.images.dtype == torch.uint8 and pool.images.shape == (21, 3, 32, 32)
    got = {k: (b, i) for b in served(pool, 3) for i, k in enumerate(b.keys)}  # one epoch: 3 x 7
    for j, key in enumerate(expected.keys):
        batch, i = got[key]
        assert torch.equal(batch.images[i], expected.images[j]), key  # uint8 + per-batch ToTensor, Normalize
        assert (batch.urls[i], batch.texts[i], batch.meta[i]) == (
            expected.urls[j],
            expected.texts[j],
            expected.meta[j],
        )


def test_a_transform_without_to_tensor_is_kept_whole(tmp_path):
    urls = make_shards(tmp_path, 2, 6)
    halve = lambda image: torch.ones(3, 4, 4) * image.getpixel((0, 0))[0] / 2  # noqa: E731
    split = split_transform(halve)
    assert not split.exact_uint8
    pool = pool_of(urls, 4, transform=halve)
    (expected,) = list(SuperBatchStream(urls, batch_size=12, transform=halve, shuffle_shards=False))
    assert pool.images.dtype == torch.float32 and torch.equal(pool.images, expected.images)


@pytest.mark.parametrize("n, size", [(24, 8), (21, 8), (17, 8), (16, 8), (30, 7), (40, 13), (8, 8), (64, 9)])
def test_epoch_orders_are_permutations_and_no_super_batch_repeats_a_sample(n, size):
    epochs = 12
    sequence = [i for e in range(epochs) for i in epoch_order(n, size, 3, e)]
    for e in range(epochs):
        assert sorted(sequence[e * n : (e + 1) * n]) == list(range(n))  # every sample once per epoch
    for t in range(len(sequence) // size):
        chunk = sequence[t * size : (t + 1) * size]
        assert len(set(chunk)) == size, (n, size, t)
    assert epoch_order(n, size, 3, 5) == epoch_order(n, size, 3, 5) != epoch_order(n, size, 4, 5)


def test_a_pool_too_small_for_its_super_batch_is_refused():
    with pytest.raises(
        ValueError, match=r"pool holds 15 readable samples, too few for super-batches of 8 .*needs"
    ):
        epoch_order(15, 8, 0, 1)
    epoch_order(16, 8, 0, 1)  # 8 divides 16: epochs never share a super-batch


def test_ranks_hold_disjoint_slices_of_the_one_process_super_batches(tmp_path):
    urls = make_shards(tmp_path, 3, 7)  # 21 samples, B = 8: super-batches straddle epoch boundaries
    whole = served(pool_of(urls, 8, rank=0, world_size=1), 12)
    ranks = [served(pool_of(urls, 4, rank=r, world_size=2), 12) for r in range(2)]
    for t, batch in enumerate(whole):
        assert ranks[0][t].keys + ranks[1][t].keys == batch.keys
        assert ranks[0][t].position == ranks[1][t].position
        assert torch.equal(torch.cat([ranks[0][t].images, ranks[1][t].images]), batch.images)
        assert len(set(batch.keys)) == 8
    keys = [k for b in whole for k in b.keys]
    assert (
        Counter(keys[:21])
        == Counter(keys[21:42])
        == Counter(f"s{s}_{i:03d}" for s in range(3) for i in range(7))
    )


def test_each_epoch_counts_the_streams_skips_once(tmp_path):
    urls = bad_sample_shards(tmp_path)
    one_pass = total_skips(SuperBatchStream(urls, batch_size=5, transform=TRANSFORM))
    assert sum(one_pass.values()) >= 10
    pool = pool_of(urls, 3, rank=0, world_size=2)  # B = 6; 7 super-batches = 2 epochs of 21
    assert pool.skipped() == dict(one_pass)
    both = [served(pool_of(urls, 3, rank=r, world_size=2), 7) for r in range(2)]
    assert total_skips(both[0] + both[1]) == one_pass + one_pass
    assert total_skips(both[0]) and total_skips(both[1])  # each rank counts those read before its samples


def test_a_resumed_pool_continues_exactly(tmp_path):
    urls = bad_sample_shards(tmp_path)
    pool = pool_of(urls, 3, rank=1, world_size=2, seed=5)
    expected = served(pool, 16)
    for stop in range(1, 16):
        head = pool.batches()
        for _ in range(stop):
            next(head)
        position = head.positions()[1]
        assert position == expected[stop - 1].position == pool.position_after(stop)
        again = pool_of(urls, 3, rank=1, world_size=2, seed=5)  # a new process
        rest = served(again, 16 - stop, position)
        for a, b in zip(rest, expected[stop:], strict=True):
            assert (a.keys, a.skipped, a.position) == (b.keys, b.skipped, b.position), stop
            assert torch.equal(a.images, b.images)


def test_positions_of_another_pool_world_size_or_stream_are_refused(tmp_path):
    urls = make_shards(tmp_path / "a", 3, 7)
    pool = pool_of(urls, 4, rank=0, world_size=2)
    position = served(pool, 2)[-1].position
    assert position == {
        "kind": "pool",
        "version": 1,
        "epoch": 0,
        "index": 16,
        "batch": 2,  # the super-batch that comes next (what its size is, under a selection schedule)
        "samples": 21,
        "keys": pool.fingerprint,
        "super_batch": 8,
        "world_size": 2,
        "seed": 0,
    }
    older = {k: v for k, v in position.items() if k != "batch"}  # recorded before positions held it
    assert next(pool.batches(older)).keys == next(pool.batches(position)).keys
    other = pool_of([*urls[:2], *make_shards(tmp_path / "b", 1, 7)], 4, rank=0, world_size=2)
    with pytest.raises(
        ValueError, match=r"recorded on a pool of 21 samples \(keys \w+\) but the pool now holds 21"
    ):
        other.batches(position)
    with pytest.raises(ValueError, match=r"recorded with world_size 2 but this run has 1$"):
        pool_of(urls, 8).batches(position)
    with pytest.raises(ValueError, match=r"recorded with super_batch 8 but this run has 10$"):
        pool_of(urls, 5, rank=0, world_size=2).batches(position)
    with pytest.raises(
        ValueError, match="is a stream's, not a memory-resident pool's: resume with data_in_mem"
    ):
        pool.batches({"worker": 0, "rng": [3, [1], None], "url": urls[0], "sample": 2})
    with pytest.raises(ValueError, match=r"has version 2; this jestclip reads version 1$"):
        pool.batches({**position, "version": 2})
    stream = SuperBatchStream(urls, batch_size=4, transform=TRANSFORM)  # and a stream given a pool's
    with pytest.raises(ValueError, match=r"^the data position is of a 'pool' source, not a stream's: resume"):
        ResumableBatches(stream, 0, position)


def test_a_pool_that_would_not_fit_is_refused_before_decoding(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, 2, 6)
    monkeypatch.setattr(pool_module, "available_memory", lambda: 100_000)
    decoded = []
    real = pool_module.split_transform

    def counting(transform):
        split = real(transform)
        return pool_module.SplitTransform(lambda im: decoded.append(1) or split.store(im), split.finish, True)

    monkeypatch.setattr(pool_module, "split_transform", counting)
    stream = SuperBatchStream(urls, batch_size=4, transform=TRANSFORM)
    with pytest.raises(
        ValueError,
        match=r"^data_in_memory: the pool would take ~[\d.]+ KiB \(up to 12 samples x [\d,]+ bytes x 16 "
        r"ranks on this machine\) but only 48\.8 KiB is allowed \(0\.5 of the 97\.7 KiB available\); "
        r"stream it \(data_in_memory=false\)$",
    ):
        MemoryPool.from_stream(stream, local_ranks=16)  # 16 ranks' pools: 12 x ~3.3 kB x 16 > 50 kB
    assert decoded == [1]  # only the first sample, which sizes the estimate
    assert len(MemoryPool.from_stream(stream)) == 12  # one rank's pool fits
    # a keep list keeping a third of the pairs: the estimate counts only those (3 ranks: 4 x ~3.3 kB x 3
    # fits in 48.8 kB where 12 x ~3.3 kB x 3 does not)
    kept = SuperBatchStream(
        urls, batch_size=2, transform=TRANSFORM, keep=lambda _, key, digest=None: key.endswith(("0", "3"))
    )
    with pytest.raises(ValueError, match=r"\(up to 4 samples x "):
        MemoryPool.from_stream(kept, local_ranks=16)
    with pytest.raises(ValueError, match=r"\(up to 12 samples x "):
        MemoryPool.from_stream(stream, local_ranks=3)
    assert len(MemoryPool.from_stream(kept, local_ranks=3)) == 4


def test_the_summary_names_what_was_loaded(tmp_path):
    urls = bad_sample_shards(tmp_path)
    line = pool_of(urls, 4).summary(1.25)
    assert line.startswith("pool: 21 samples from 3 shards in memory (")
    assert "images 3x32x32 uint8), " in line and "bad_image 6" in line and line.endswith("decoded in 1.2 s")
