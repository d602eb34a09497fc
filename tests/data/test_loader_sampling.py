"""Sampling without repeats: no (shard, key) twice in a super-batch, ranks and workers on disjoint shards in
every step, and repeats the data itself holds counted by name; and pairs with dotted keys counted, not merged
silently."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from jestclip.data import SuperBatchStream
from jestclip.data.stream import SHARD_REASONS, TooFewSamplesError

from .test_loader import good, make_shards, total_skips, write_tar


def repeats(keys: list[str], urls: list[str]) -> int:
    """Samples of a batch that already appeared in it."""
    return len(keys) - len(set(zip(urls, keys, strict=True)))


def test_a_resampled_super_batch_never_holds_a_sample_twice(tmp_path):
    # The case: 6 shards of 8, B = 20; drawing shards with replacement put a sample twice into 6 of
    # the first 10 super-batches (and joint selection chose both copies).
    urls = make_shards(tmp_path, 6, 8)
    for seed in range(3):
        batches = list(itertools.islice(SuperBatchStream(urls, batch_size=20, resampled=True, seed=seed), 30))
        assert [repeats(b.keys, b.urls) for b in batches] == [0] * 30
        assert all(len(b) == 20 for b in batches)
        # each epoch (48 samples) reads every sample once: over 600, all 48 come 11 to 14 times (a sample
        # left out where an epoch ends in a batch is not made up for)
        read = Counter((u, k) for b in batches for u, k in zip(b.urls, b.keys, strict=True))
        assert len(read) == 48 and 11 <= min(read.values()) and max(read.values()) <= 14


def test_a_sample_met_again_where_an_epoch_ends_is_left_out_by_name(tmp_path):
    # One worker, 2 shards of 3: a batch of 5 always spans an epoch's end, and when the next epoch starts
    # with the shard the last one ended with, that shard's samples would come twice.
    urls = make_shards(tmp_path, 2, 3)
    batches = list(itertools.islice(SuperBatchStream(urls, batch_size=5, epochs=None, seed=0), 40))
    assert all(repeats(b.keys, b.urls) == 0 and len(b) == 5 for b in batches)
    left_out = total_skips(batches)["repeat_in_batch"]
    assert left_out > 0
    # every sample read is either in a batch or left out (the 41st batch's first sample was read too)
    epochs = (40 * 5 + left_out + 1) / 6
    assert epochs == int(epochs) or epochs > 33


def test_ranks_read_disjoint_samples_in_every_step(tmp_path):
    # The case: with 2 ranks over 8 shards, 32 of 128 samples were on both ranks in the same step.
    urls = make_shards(tmp_path, 8, 8)
    for kw in ({"resampled": True}, {"epochs": None}, {"epochs": 3}):
        per_rank = [
            list(
                itertools.islice(
                    SuperBatchStream(urls, batch_size=16, rank=rank, world_size=2, seed=1, **kw), 12
                )
            )
            for rank in range(2)
        ]
        for step, (a, b) in enumerate(zip(*per_rank, strict=True)):
            assert not set(zip(a.urls, a.keys, strict=True)) & set(zip(b.urls, b.keys, strict=True)), step
        shards = [{u for batch in batches for u in batch.urls} for batches in per_rank]
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 8, kw


def test_uneven_shards_keep_ranks_apart_across_epochs(tmp_path):
    # rank 0's shards are short: it starts its next epochs while rank 1 is still in its first; each rank
    # still reads only its own shards
    urls = []
    for s, size in enumerate([2, 2, 9, 9]):
        members = [m for i in range(size) for m in good(f"s{s}_{i}", i)]
        urls.append(write_tar(tmp_path / f"{s:05d}.tar", members))
    streams = [
        SuperBatchStream(urls, batch_size=3, rank=r, world_size=2, epochs=None, seed=0) for r in (0, 1)
    ]
    seen = [{u for b in itertools.islice(stream, 20) for u in b.urls} for stream in streams]
    assert not seen[0] & seen[1]


def test_loader_workers_read_disjoint_shards(tmp_path):
    urls = make_shards(tmp_path, 4, 5)
    stream = SuperBatchStream(urls, batch_size=5, resampled=True, seed=2)
    batches = list(itertools.islice(DataLoader(stream, batch_size=None, num_workers=2), 16))
    by_worker: dict[int, set[str]] = {}
    for batch in batches:
        by_worker.setdefault(batch.position["worker"], set()).update(batch.urls)
    assert len(by_worker) == 2 and not by_worker[0] & by_worker[1]


def test_a_shard_listed_twice_is_read_once_and_counted(tmp_path):
    urls = make_shards(tmp_path, 2, 3)
    batches = list(SuperBatchStream([urls[0], urls[1], urls[0]], batch_size=4, shuffle_shards=False))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(f"s{s}_{i:03d}" for s in range(2) for i in range(3))
    assert total_skips(batches) == {"duplicate_shard": 1} and "duplicate_shard" in SHARD_REASONS
    rank1 = SuperBatchStream([urls[0], urls[1], urls[0]], batch_size=4, rank=1, world_size=2)
    assert total_skips(list(rank1)) == {}  # counted once per stream, by rank 0


def test_one_shard_under_two_names_is_one_shard(tmp_path):
    """A symlink in the pool directory and ``dir/./00000.tar``: the shard was read twice per epoch,
    uncounted, its pairs on two ranks in one step and twice in a super-batch."""
    import os

    from jestclip.data.shardlist import distinct_shards, expand_urls

    urls = make_shards(tmp_path, 6, 8)
    os.symlink(urls[0], tmp_path / "zz-link.tar")  # sorts last in the directory
    os.link(urls[1], tmp_path / "zz-hard.tar")
    listed = [str(tmp_path / "." / "00002.tar"), str(tmp_path)]
    assert len(expand_urls(listed)) == 9
    assert distinct_shards(expand_urls(listed)) == ([listed[0], *urls[:2], *urls[3:]], 3)
    epoch = list(SuperBatchStream(listed, batch_size=20, shuffle_shards=False))
    keys = [k for b in epoch for k in b.keys]
    assert len(keys) == 48 == len(set(keys)) and total_skips(epoch) == {"duplicate_shard": 3}
    for seed in range(3):  # B = 20 from 6 shards of 8: no key twice in any super-batch
        batches = itertools.islice(SuperBatchStream(listed, batch_size=20, resampled=True, seed=seed), 10)
        assert all(len(set(b.keys)) == 20 for b in batches)
    ranks = [SuperBatchStream(listed, batch_size=8, rank=r, world_size=2, seed=1) for r in range(2)]
    first = [set(next(iter(stream)).keys) for stream in ranks]
    assert not first[0] & first[1]
    assert sum(len(stream.urls) for stream in ranks) == 2 * 6
    from jestclip.report.reference import count_samples  # the samples cache-reference embeds: once each

    assert count_samples(listed) == 48


def test_too_few_distinct_samples_for_a_super_batch_is_one_clear_error(tmp_path):
    urls = make_shards(tmp_path, 2, 3)
    with pytest.raises(TooFewSamplesError) as info:
        next(iter(SuperBatchStream(urls, batch_size=7, resampled=True)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "a super-batch of 7 cannot be filled without repeating a sample: rank 0's loader"
    )
    assert "reads 2 of 2 shards, which hold only 6 readable samples" in message


def test_fewer_shards_than_ranks_is_refused_resampled_or_not(tmp_path):
    urls = make_shards(tmp_path, 1, 4)
    for resampled in (True, False):
        with pytest.raises(ValueError, match=r"1 shards cannot be split over 2 ranks \(ranks read disjoint"):
            SuperBatchStream(urls, batch_size=2, rank=0, world_size=2, resampled=resampled)


def test_pairs_with_dotted_keys_are_counted_each_not_merged_into_one(tmp_path):
    # The case: six img_v1.N pairs beside four plain ones merged into one sample "img_v1", counted
    # once as missing_image. webdataset's key ends at the first dot, so they cannot be read as pairs.
    members = []
    for i in range(6):
        members += [(f"img_v1.{i}.jpg", b"jpeg bytes"), (f"img_v1.{i}.txt", b"a caption")]
    for i in range(4):
        members += good(f"plain{i}", i)
    url = write_tar(tmp_path / "00000.tar", members)
    (batch,) = list(SuperBatchStream([url], batch_size=10))
    assert batch.keys == [f"plain{i}" for i in range(4)]
    assert batch.skipped == {"dotted_key": 6}
    # a dotted pair behind a readable sample of the same webdataset key is counted too
    url = write_tar(
        tmp_path / "00001.tar", [*good("photo", 1), ("photo.v2.png", b"x"), ("photo.v2.txt", b"y")]
    )
    (batch,) = list(SuperBatchStream([url], batch_size=10))
    assert batch.keys == ["photo"] and batch.skipped == {"dotted_key": 1}
    # other dotted members (webdataset's multi-part extensions such as seg.png's siblings) are not pairs
    url = write_tar(tmp_path / "00002.tar", [*good("a", 1), ("a.png.bak", b"x"), ("a.meta.json", b"{}")])
    (batch,) = list(SuperBatchStream([url], batch_size=10))
    assert batch.keys == ["a"] and batch.skipped == {}
