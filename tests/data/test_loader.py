"""The keyed loader on tiny shards generated here, corrupt members included."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from jestclip.data import Pair, SuperBatchStream, decode_sample, expand_urls, png_bytes, write_shard


def image(i: int, size: int = 8) -> bytes:
    return png_bytes(Image.new("RGB", (size, size), (i * 7 % 256, i * 13 % 256, i * 29 % 256)))


def make_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    paths = []
    for s in range(n_shards):
        pairs = [
            Pair(f"s{s}_{i:03d}", image(s * per_shard + i), f"text {s} {i}", {"class_id": i % 3})
            for i in range(per_shard)
        ]
        path = root / f"{s:05d}.tar"
        assert write_shard(path, pairs) == per_shard
        paths.append(str(path))
    return paths


def add_members(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_keys_urls_texts_and_meta_survive_to_the_batch(tmp_path):
    urls = make_shards(tmp_path, 2, 5)
    batches = list(SuperBatchStream(urls, batch_size=4, shuffle_shards=False))
    assert [len(b) for b in batches] == [4, 4, 2]
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"s{s}_{i:03d}" for s in range(2) for i in range(5)]
    first = batches[0]
    assert first.urls[0] == urls[0] and first.texts[0] == "text 0 0" and first.meta[1] == {"class_id": 1}
    assert first.images.shape == (4, 3, 8, 8) and first.images.dtype == torch.float32
    # pixels are the ones written (red channel of sample 1 = 7)
    assert round(float(first.images[1, 0, 0, 0]) * 255) == 7


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    add_members(
        Path(url),
        {
            "badimg.png": b"not a png",
            "badimg.txt": b"caption",
            "notext.png": image(1),
            "emptytext.png": image(2),
            "emptytext.txt": b"   \n",
            "latin1.png": image(3),
            "latin1.txt": "caf\xe9".encode("latin-1"),
            "noimage.txt": b"orphan caption",
            "badjson.png": image(4),
            "badjson.txt": b"ok",
            "badjson.json": b"{not json",
        },
    )
    (batch,) = list(SuperBatchStream([url], batch_size=100))
    assert batch.keys == ["s0_000", "s0_001", "s0_002"]
    assert batch.skipped == {
        "bad_image": 1,
        "missing_text": 1,
        "empty_text": 1,
        "bad_text": 1,
        "missing_image": 1,
        "bad_json": 1,
    }


def test_truncated_shard_is_counted_not_fatal(tmp_path):
    urls = make_shards(tmp_path, 2, 4)
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) // 2 + 100])
    batches = list(SuperBatchStream(urls, batch_size=3, shuffle_shards=False))
    keys = [k for b in batches for k in b.keys]
    assert keys[-4:] == [f"s1_{i:03d}" for i in range(4)]  # the good shard is read in full
    assert sum(Counter(b.skipped)["bad_shard"] for b in batches) >= 1


def test_ranks_and_workers_partition_an_epoch_exactly(tmp_path):
    urls = make_shards(tmp_path, 6, 3)
    seen: list[str] = []
    for rank in range(2):
        stream = SuperBatchStream(urls, batch_size=2, rank=rank, world_size=2, seed=3)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        seen += [k for b in loader for k in b.keys]
    assert sorted(seen) == sorted(f"s{s}_{i:03d}" for s in range(6) for i in range(3))


def test_epochs_and_shard_shuffling_are_deterministic(tmp_path):
    urls = make_shards(tmp_path, 4, 2)

    def keys(**kw):
        return [k for b in SuperBatchStream(urls, batch_size=3, **kw) for k in b.keys]

    two = keys(epochs=2, seed=1)
    assert len(two) == 16 and Counter(two) == Counter(keys(epochs=1, seed=1) * 2)
    assert two == keys(epochs=2, seed=1)
    assert keys(seed=1) != keys(seed=2) or keys(seed=1) != keys(seed=3)


def test_resampled_stream_is_infinite_and_seeded(tmp_path):
    urls = make_shards(tmp_path, 3, 2)
    stream = SuperBatchStream(urls, batch_size=5, resampled=True, seed=4)
    it = iter(stream)
    got = [next(it).keys for _ in range(10)]
    assert len({k for ks in got for k in ks}) == 6
    again = iter(SuperBatchStream(urls, batch_size=5, resampled=True, seed=4))
    assert [next(again).keys for _ in range(10)] == got


def test_shuffle_buffer_permutes_within_an_epoch(tmp_path):
    urls = make_shards(tmp_path, 2, 10)
    plain = [k for b in SuperBatchStream(urls, batch_size=7, shuffle_shards=False) for k in b.keys]
    mixed = [
        k
        for b in SuperBatchStream(urls, batch_size=7, shuffle_shards=False, shuffle_buffer=8)
        for k in b.keys
    ]
    assert sorted(mixed) == sorted(plain) and mixed != plain


def test_drop_last_and_bad_arguments(tmp_path):
    urls = make_shards(tmp_path, 1, 5)
    assert [len(b) for b in SuperBatchStream(urls, batch_size=2, drop_last=True)] == [2, 2]
    with pytest.raises(ValueError, match="1 shards cannot be split over 2 ranks"):
        SuperBatchStream(urls, batch_size=2, rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SuperBatchStream(urls, batch_size=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \.tar shards in directory"):
        SuperBatchStream(empty, batch_size=1)


def test_mixed_image_sizes_need_a_resizing_transform(tmp_path):
    path = tmp_path / "00000.tar"
    write_shard(path, [Pair("a", image(0, 8), "x"), Pair("b", image(1, 16), "y")])
    with pytest.raises(ValueError, match="key 'b'"):
        list(SuperBatchStream([str(path)], batch_size=2))
    resize = lambda im: torch.zeros(3, 4, 4)  # noqa: E731
    (batch,) = list(SuperBatchStream([str(path)], batch_size=2, transform=resize))
    assert batch.images.shape == (2, 3, 4, 4)


def test_brace_patterns_and_directories(tmp_path):
    make_shards(tmp_path, 3, 1)
    assert expand_urls(str(tmp_path / "{00000..00002}.tar")) == expand_urls(tmp_path)


def test_decode_sample_reports_missing_key():
    assert decode_sample({"png": image(0), "txt": b"x"}) == "missing_key"


def test_write_shard_is_atomic_and_rejects_dotted_keys(tmp_path):
    path = tmp_path / "00000.tar"
    with pytest.raises(ValueError, match="must not contain"):
        write_shard(path, [Pair("a.b", image(0), "x")])
    assert not path.exists()
