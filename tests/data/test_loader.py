"""The keyed loader on tiny shards generated here, corrupt members included."""

from __future__ import annotations

import io
import signal
import struct
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from jestclip.data import (
    NoReadableSampleError,
    Pair,
    SuperBatchStream,
    decode,
    decode_sample,
    expand_urls,
    png_bytes,
    shardlist,
    write_shard,
)
from jestclip.data.stream import ResumableBatches


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


# captions that open_clip's tokenizer cleans to nothing (ftfy, HTML entities twice, whitespace): [SOT, EOT]
EMPTY_ONCE_CLEANED = ["&nbsp;", "&amp;nbsp;", "\ufeff", "\x00\x00", " \u2028 \t", "&#32;"]


def test_captions_empty_once_the_tokenizer_cleans_them_are_skipped_as_empty_text(tmp_path):
    from jestclip.models import tokenizer

    kept = ["caf\u00e9", "&amp;", "\u200b"]
    tokens = tokenizer("jest-micro")([*EMPTY_ONCE_CLEANED, *kept])
    assert (tokens[:6] != 0).sum(1).tolist() == [2] * 6  # [SOT, EOT]: one shared empty text
    assert ((tokens[6:] != 0).sum(1) > 2).all()
    (url,) = make_shards(tmp_path, 1, 2)
    members = {}
    for i, caption in enumerate([*EMPTY_ONCE_CLEANED, *kept]):
        members |= {f"c{i}.png": image(i), f"c{i}.txt": caption.encode("utf-8")}
    add_members(Path(url), members)
    (batch,) = list(SuperBatchStream([url], batch_size=100))
    assert batch.keys == ["s0_000", "s0_001", "c6", "c7", "c8"]
    assert batch.texts[2:] == kept  # kept as written: the tokenizer cleans
    assert batch.skipped == {"empty_text": 6}
    assert all(decode.caption_is_empty(c) for c in EMPTY_ONCE_CLEANED)


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
    with pytest.raises(ValueError, match=r"no shards \(\.tar, \.tar\.gz, .*\) in directory"):
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


def gzipped(path: str) -> str:
    """The shard at ``path`` rewritten as ``path.gz`` (a ``.tar.gz`` shard), the ``.tar`` removed."""
    import gzip

    out = Path(f"{path}.gz")
    out.write_bytes(gzip.compress(Path(path).read_bytes()))
    Path(path).unlink()
    return str(out)


def test_a_directory_yields_every_shard_form_the_loader_reads(tmp_path):
    """Two .tar and two .tar.gz shards: only the .tar ones were read, half the pool left out, no count."""
    urls = make_shards(tmp_path, 4, 2)
    urls[2:] = [gzipped(urls[2]), gzipped(urls[3])]
    (tmp_path / "00000.reference.json").write_text("{}")  # a sidecar, not a shard
    (tmp_path / "00002.tar.reference.json").write_text("{}")  # a .tar.gz shard's sidecar
    (tmp_path / "00004.tar.tmp").write_bytes(b"")  # a write cut short
    assert expand_urls(tmp_path) == urls and expand_urls(str(tmp_path)) == urls
    keys = [k for b in SuperBatchStream(tmp_path, batch_size=100, shuffle_shards=False) for k in b.keys]
    assert keys == [f"s{s}_{i:03d}" for s in range(4) for i in range(2)]
    assert set(shardlist.SHARD_SUFFIXES) >= {".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"}
    # a form it cannot read: the whole directory is refused by name, not read in part
    (tmp_path / "00005.tar.lz4").write_bytes(b"\x04\x22\x4d\x18")
    with pytest.raises(
        ValueError, match=r"holds 1 shard\(s\) in a form the loader cannot read \(00005.tar.lz4\)"
    ):
        expand_urls(tmp_path)


def test_decode_sample_reports_missing_key():
    assert decode_sample({"png": image(0), "txt": b"x"}) == "missing_key"


def test_write_shard_is_atomic_and_rejects_dotted_keys(tmp_path):
    path = tmp_path / "00000.tar"
    with pytest.raises(ValueError, match="must not contain"):
        write_shard(path, [Pair("a.b", image(0), "x")])
    assert not path.exists()


# --- reliability: bad data is skipped, counted exactly, and never hangs the stream -------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A shard with exactly these members, in this order (duplicates and junk included)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good(key: str, i: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image(i)), (f"{key}.txt", f"caption {key}".encode())]


def total_skips(batches) -> Counter:
    return sum((Counter(b.skipped) for b in batches), Counter())


def test_skips_summed_over_batches_equal_the_truth(tmp_path):
    urls = []
    for s in range(3):
        members: list[tuple[str, bytes]] = []
        for i in range(6):
            members += good(f"s{s}_{i}", i)
            if i == 1:
                members += [(f"s{s}_bad.png", b"not a png"), (f"s{s}_bad.txt", b"x")]
            if i == 3:
                members += [(f"s{s}_notext.png", image(i))]
            if i == 4:
                members += [(f"s{s}_empty.png", image(i)), (f"s{s}_empty.txt", b" \n")]
        urls.append(write_tar(tmp_path / f"{s:05d}.tar", members))
    # a bad tail after the last good sample, which completes the last batch (18 = 3 x 6)
    add_members(Path(urls[2]), {"tail.png": image(1), "tail.txt": b"x", "tail.json": b"{not json"})
    truth = Counter(bad_image=3, missing_text=3, empty_text=3, bad_json=1)
    for workers in (0, 2):
        stream = SuperBatchStream(urls, batch_size=6, shuffle_shards=False)
        batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert sum(len(b) for b in batches) == 18
        assert total_skips(batches) == truth, workers
    per_batch = [b.skipped for b in SuperBatchStream(urls, batch_size=6, shuffle_shards=False)]
    assert all(per_batch) and len(per_batch) == 3  # spread over every batch, none counted twice


def test_truncated_shard_is_counted_and_the_stream_goes_on(tmp_path):
    urls = make_shards(tmp_path, 2, 4)
    data = Path(urls[0]).read_bytes()
    with tarfile.open(urls[0]) as tar:
        third_png = next(m for m in tar.getmembers() if m.name == "s0_002.png")
    for cut in (third_png.offset_data + 10, third_png.offset):  # mid-member; at a member boundary
        Path(urls[0]).write_bytes(data[:cut])
        batches = list(SuperBatchStream(urls, batch_size=3, shuffle_shards=False))
        keys = [k for b in batches for k in b.keys]
        assert keys == ["s0_000", "s0_001"] + [f"s1_{i:03d}" for i in range(4)]
        # members are written json, png, txt: s0_002's json was read, the rest of it is lost
        assert total_skips(batches) == {"truncated_shard": 1, "truncated_sample": 1}


def test_duplicate_keys_are_counted_and_the_first_is_kept(tmp_path):
    members = good("a", 1) + good("b", 2) + [("a.png", image(3)), ("a.txt", b"second a")]  # a again, later
    members += [("b.txt", b"b again"), ("b.png", image(4))]  # b again, right after (a new txt for b)
    members += [*good("c", 5), ("c.txt", b"c's second caption")]  # the same member twice in a row
    url = write_tar(tmp_path / "00000.tar", members)
    (batch,) = list(SuperBatchStream([url], batch_size=10))
    assert batch.keys == ["a", "b", "c"] and batch.texts == ["caption a", "caption b", "caption c"]
    assert batch.skipped == {"duplicate_key": 3}


def test_a_shard_without_readable_samples_warns_once_by_name(tmp_path):
    (good_url,) = make_shards(tmp_path, 1, 2)
    bad = write_tar(tmp_path / "bad.tar", [("x.png", b"junk"), ("x.txt", b"caption"), ("y.txt", b"no image")])
    stream = SuperBatchStream([good_url, bad], batch_size=2, epochs=3, shuffle_shards=False)
    with pytest.warns(RuntimeWarning) as record:
        assert sum(len(b) for b in stream) == 6
        assert sum(len(b) for b in stream) == 6  # a second pass of the same stream warns no more
    messages = [str(w.message) for w in record]
    assert messages == [f"shard {bad} has no readable sample (bad_image 1, missing_image 1)"]


def test_missing_paths_and_patterns_fail_fast_naming_them(tmp_path):
    make_shards(tmp_path, 2, 1)
    with pytest.raises(ValueError, match=r"shard '.*/typo\.tar' does not exist"):
        expand_urls(tmp_path / "typo.tar")
    pattern = str(tmp_path / "{00000..00005}.tar")
    with pytest.raises(ValueError, match=r"\{00000\.\.00005\}\.tar': 4 of 6 files missing \(.*00002\.tar, "):
        SuperBatchStream(pattern, batch_size=1, resampled=True)
    with pytest.raises(ValueError, match=r"00009\.tar' does not exist"):
        expand_urls([tmp_path / "00000.tar", str(tmp_path / "00009.tar")])
    assert len(expand_urls(["pipe:cat x.tar", "https://host/{0..2}.tar"])) == 4  # remote: checked on open


def junk_shards(root: Path, n: int) -> list[str]:
    urls = [root / f"junk{i}.tar" for i in range(n - 1)]
    for i, url in enumerate(urls):
        url.write_bytes(bytes(range(256)) * (i + 1))
    corrupt = write_tar(root / "corrupt.tar", [("x.png", b"junk"), ("x.txt", b"caption")])
    return [*map(str, urls), corrupt]


class StillRunning(BaseException):
    """Not an Exception, so the loader's own handlers cannot swallow it."""


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the block takes longer than ``seconds``."""

    def timeout(*_) -> None:
        raise StillRunning(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kw", [{"resampled": True}, {"epochs": None}, {"require_samples": True}])
def test_only_unreadable_shards_raise_instead_of_hanging(tmp_path, kw):
    urls = junk_shards(tmp_path, 3)
    with within(10), pytest.warns(RuntimeWarning), pytest.raises(NoReadableSampleError) as info:
        next(iter(SuperBatchStream(urls, batch_size=2, **kw)))
    message = str(info.value)
    assert message.startswith("no readable sample in 3 shards tried: ") and all(u in message for u in urls)
    assert "bad_image" in message and "bad_shard" in message  # what was wrong with them


def test_no_readable_sample_reaches_the_main_process_from_a_worker(tmp_path):
    urls = junk_shards(tmp_path, 2)
    loader = DataLoader(SuperBatchStream(urls, batch_size=2, resampled=True), batch_size=None, num_workers=1)
    batches = iter(loader)
    try:
        with within(10), pytest.raises(NoReadableSampleError) as info:
            next(batches)
        # one line, the worker's own message (not torch's "Caught ... Original Traceback" text)
        message = str(info.value)
        assert "\n" not in message and message.startswith("no readable sample in 2 shards tried: ")
        assert all(url in message for url in urls)
    finally:  # torch's re-raise leaves a reference cycle: shut the worker down now, not in a later test's gc
        batches._shutdown_workers()


def test_a_few_good_shards_among_bad_ones_never_raise(tmp_path):
    (good_url,) = make_shards(tmp_path, 1, 2)
    urls = [good_url, *junk_shards(tmp_path, 8)]
    stream = iter(SuperBatchStream(urls, batch_size=2, resampled=True, seed=5))
    with pytest.warns(RuntimeWarning):
        assert all(next(stream).keys == ["s0_000", "s0_001"] for _ in range(20))
    finite = SuperBatchStream(urls, batch_size=3, shuffle_shards=False)  # finite passes only warn by default
    with pytest.warns(RuntimeWarning):
        assert [b.keys for b in finite] == [["s0_000", "s0_001"]]


def test_a_worker_without_shards_ends_instead_of_spinning(tmp_path):
    urls = make_shards(tmp_path, 1, 2)
    stream = SuperBatchStream(urls, batch_size=2, epochs=None)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=2, timeout=20))
    assert [next(batches).keys for _ in range(3)] == [["s0_000", "s0_001"]] * 3


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_images_over_the_pixel_limit_are_skipped_without_pil_warnings(tmp_path, monkeypatch):
    members = good("ok", 1)
    # over our limit only; over PIL's warning limit (~89 Mpx); over PIL's error limit (2x that)
    for name, (w, h) in {"big": (9000, 9000), "bigger": (10_000, 10_000), "bomb": (100_000, 100_000)}.items():
        members += [(f"{name}.png", png_header(w, h)), (f"{name}.txt", b"caption")]
    url = write_tar(tmp_path / "00000.tar", members)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        (batch,) = list(SuperBatchStream([url], batch_size=10))
    assert batch.keys == ["ok"] and batch.skipped == {"image_too_large": 3}
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 8 * 8 - 1)
    assert decode_sample({"__key__": "k", "png": image(0, 8), "txt": b"x"}) == "image_too_large"
    assert decode_sample({"__key__": "k", "png": image(0, 7), "txt": b"x"}).text == "x"


def thin_png(width: int, height: int) -> bytes:
    return png_bytes(Image.new("L", (width, height), 128))


def test_a_thin_image_is_skipped_before_the_transform_makes_it_huge(tmp_path):
    """A 1 x 8000 PNG of ~100 bytes: open_clip's transform at 224 px resizes its shorter side to 224 first,
    224 x 1,792,000 pixels (+1.6 GB, 6 s). It is skipped from its header, the transform never sees it."""
    assert len(thin_png(1, 8000)) < 200
    members = good("ok", 1)
    for name, (w, h) in {
        "line": (1, 8000),
        "column": (8000, 1),
        "strip": (2, 2 * 21),
        "banner": (21, 1),
    }.items():
        members += [(f"{name}.png", thin_png(w, h)), (f"{name}.txt", b"caption")]
    members += [("edge.png", thin_png(20, 1)), ("edge.txt", b"caption")]  # exactly the limit: kept
    url = write_tar(tmp_path / "00000.tar", members)
    seen = []

    def transform(im):
        seen.append(im.size)
        return torch.zeros(3, 4, 4)

    (batch,) = list(SuperBatchStream([url], batch_size=10, transform=transform, shuffle_shards=False))
    assert batch.keys == ["ok", "edge"] and seen == [(8, 8), (20, 1)]
    assert batch.skipped == {"aspect_ratio_too_large": 4}
    assert decode.MAX_ASPECT_RATIO == 20
    assert decode_sample({"__key__": "k", "png": thin_png(1, 8000), "txt": b"x"}) == "aspect_ratio_too_large"


def test_any_decoder_failure_is_a_bad_image(monkeypatch):
    def broken_decoder(*_, **__):
        raise IndexError("a decoder bug")

    monkeypatch.setattr(decode.Image, "open", broken_decoder)
    assert decode_sample({"__key__": "k", "png": image(0), "txt": b"x"}) == "bad_image"


# --- resume: a recorded position continues the stream exactly, without decoding what was consumed ---------


def bad_sample_shards(root: Path) -> list[str]:
    """Three shards of 7 good samples with bad ones among them and at the end, and a duplicate key, so skips
    fall on both sides of any resume point."""
    urls = []
    for s in range(3):
        members: list[tuple[str, bytes]] = []
        for i in range(7):
            members += good(f"s{s}_{i}", i)
            if i in (s, s + 3):
                members += [(f"s{s}_bad{i}.png", b"junk"), (f"s{s}_bad{i}.txt", b"x")]
            if i == 2 * s:
                members += [(f"s{s}_notext{i}.png", image(i)), (f"s{s}_0.txt", b"again")]
        urls.append(write_tar(root / f"{s:05d}.tar", [*members, ("tail.png", image(1)), ("tail.txt", b" ")]))
    return urls


def resumed_after(urls: list[str], kw: dict, workers: int, stop: int, total: int | None) -> list:
    """``stop`` batches, then, from the position they left, the rest up to ``total`` (None: to the end)."""
    first = ResumableBatches(SuperBatchStream(urls, **kw), workers)
    head = [next(first) for _ in range(stop)]
    rest = ResumableBatches(SuperBatchStream(urls, **kw), workers, first.position())
    return head + (list(rest) if total is None else [next(rest) for _ in range(total - stop)])


STREAMS = {
    "resampled": ({"batch_size": 5, "resampled": True, "seed": 3}, 9),
    "endless epochs": ({"batch_size": 5, "epochs": None, "seed": 1}, 9),
    "two epochs": ({"batch_size": 4, "epochs": 2, "seed": 1}, None),  # with 2 workers one ends first
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", list(STREAMS))
def test_a_resumed_stream_continues_exactly_skips_included(tmp_path, kind, workers):
    urls = bad_sample_shards(tmp_path)
    kw, total = STREAMS[kind]
    whole = ResumableBatches(SuperBatchStream(urls, **kw), workers)
    expected = list(whole) if total is None else [next(whole) for _ in range(total)]
    assert sum(bool(b.skipped) for b in expected) >= 4
    assert {b.position["worker"] for b in expected} == set(range(max(1, workers)))
    stops = range(1, len(expected) + 1) if workers == 0 else (1, 2, 3, 6, 8, 9, len(expected))
    for stop in sorted(set(stops)):
        got = resumed_after(urls, kw, workers, stop, total)
        assert [b.keys for b in got] == [b.keys for b in expected], stop
        assert [b.skipped for b in got] == [b.skipped for b in expected], stop
        assert [b.position for b in got] == [b.position for b in expected], stop


def test_a_resumed_stream_decodes_only_what_comes_next(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, 2, 12)
    kw = {"batch_size": 5, "resampled": True, "seed": 2}
    whole = ResumableBatches(SuperBatchStream(urls, **kw), 0)
    expected = [next(whole) for _ in range(31)]
    position = expected[29].position  # after 150 samples: 6 of the 13th shard drawn were consumed
    assert position["sample"] == 6
    decoded: list[str] = []
    counting = lambda raw, **kw: decoded.append(raw["__key__"]) or decode_sample(raw, **kw)  # noqa: E731
    monkeypatch.setattr("jestclip.data.stream.decode_sample", counting)
    resumed = ResumableBatches(SuperBatchStream(urls, **kw), 0, {"workers": [position], "next": 0})
    assert next(resumed).keys == expected[30].keys
    assert len(decoded) == 5 + 1  # the batch and the sample after it (held for its skips), nothing before


def test_positions_that_cannot_resume_are_refused_by_name(tmp_path):
    urls = make_shards(tmp_path, 3, 4)
    shuffled = SuperBatchStream(urls, batch_size=2, shuffle_buffer=8)
    batches = ResumableBatches(shuffled, 0)
    next(batches)
    assert batches.position() is None  # the buffer's contents are not recorded
    with pytest.raises(ValueError, match="shuffle_buffer=8: a stream with a shuffle buffer cannot resume"):
        shuffled.resumed({"workers": [None], "next": 0})
    two = ResumableBatches(SuperBatchStream(urls, batch_size=2, resampled=True), 2)
    for _ in range(3):
        next(two)
    position = two.position()
    with pytest.raises(ValueError, match=r"recorded with num_workers=2; resuming with num_workers=0 .*use"):
        ResumableBatches(SuperBatchStream(urls, batch_size=2, resampled=True), 0, position)
    wrong_worker = {"worker": 1, "url": urls[0], "sample": 0, "epoch": 0, "shard": 0}
    with pytest.raises(ValueError, match="rank 0's loader worker 0 is not this stream's"):
        SuperBatchStream(urls, batch_size=2).resumed({"workers": [wrong_worker], "next": 0})
    drawn = {"worker": 0, "url": urls[0], "sample": 1, "rng": [3, [0] * 625, None]}  # before disjoint shards
    with pytest.raises(ValueError, match=r"drew shards with replacement .* cannot be continued: start"):
        SuperBatchStream(urls, batch_size=2, resampled=True).resumed({"workers": [drawn], "next": 0})
    (tmp_path / "more").mkdir()
    reading = position["workers"][0]["url"]
    other = [u for u in urls if u != reading] + make_shards(tmp_path / "more", 2, 1)  # its shard is gone
    with pytest.raises(ValueError, match=r"was reading shard .*, but the shard list \(4 shards\) now puts"):
        SuperBatchStream(other, batch_size=2, resampled=True).resumed(position)


def _positions_worker(rank: int, store: str, urls: list[str], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        batches = ResumableBatches(SuperBatchStream(urls, batch_size=3, resampled=True), 0)
        keys = [next(batches).keys for _ in range(2)]
        torch.save({"positions": batches.positions(), "keys": keys}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_positions_are_gathered_from_every_rank(tmp_path):
    urls = make_shards(tmp_path, 2, 4)
    out = str(tmp_path / "out")
    torch.multiprocessing.spawn(_positions_worker, args=(str(tmp_path / "store"), urls, out), nprocs=2)
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert results[0]["positions"] == results[1]["positions"]  # every rank holds all of them, in rank order
    for rank, position in enumerate(results[0]["positions"]):
        kw = {"batch_size": 3, "resampled": True, "rank": rank, "world_size": 2}
        whole = ResumableBatches(SuperBatchStream(urls, **kw), 0)
        resumed = ResumableBatches(SuperBatchStream(urls, **kw), 0, position)
        assert [next(whole).keys for _ in range(3)] == [*results[rank]["keys"], next(resumed).keys]
    assert results[0]["positions"][0] != results[0]["positions"][1]  # each rank draws its own shards


# --- reduced-size JPEG decoding (PIL's draft mode) ----------------------------------------------------------


def jpeg(width: int, height: int) -> bytes:
    """A smooth JPEG (gradients and a soft ring), like a photo's low frequencies."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    ring = torch.exp(-((((x - 0.4) ** 2 + (y - 0.6) ** 2).sqrt() - 0.25) ** 2) / 0.01)
    pixels = torch.stack([200 * x + 40 * ring, 180 * y, 120 + 100 * ring], dim=-1).clamp(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "size, decode_size, decoded",
    [
        ((512, 512), 224, (256, 256)),  # 1/2: 1/4 would be 128 < 224
        ((1000, 600), 224, (500, 300)),  # the shorter side decides
        ((2000, 1800), 224, (250, 225)),  # 1/8 is the smallest scale libjpeg offers
        ((300, 300), 224, (300, 300)),  # under 2x the target: decoded in full
        ((512, 512), None, (512, 512)),
    ],
)
def test_jpegs_decode_at_the_smallest_scale_covering_decode_size(size, decode_size, decoded):
    sample = decode_sample({"__key__": "k", "jpg": jpeg(*size), "txt": b"x"}, decode_size=decode_size)
    assert sample.image.size == decoded and sample.image.mode == "RGB"


def test_other_formats_decode_in_full():
    sample = decode_sample({"__key__": "k", "png": image(0, 64), "txt": b"x"}, decode_size=8)
    assert sample.image.size == (64, 64)


def test_a_reduced_decode_gives_nearly_the_same_model_input():
    from jestclip.models import image_transform

    transform = image_transform("ViT-B-16")  # resize the shorter side to 224, centre crop, normalise
    data = jpeg(1024, 768)
    full = transform(decode.open_image(data))
    reduced = transform(decode.open_image(data, decode_size=224))
    assert decode.open_image(data, decode_size=224).size == (512, 384)
    assert full.shape == reduced.shape == (3, 224, 224)
    assert (full - reduced).abs().mean() < 0.02  # normalised units (~1/255 is 0.015)


def test_the_stream_decodes_at_its_decode_size(tmp_path):
    url = write_tar(tmp_path / "00000.tar", [("a.jpg", jpeg(512, 512)), ("a.txt", b"x")])
    sizes = []
    (batch,) = SuperBatchStream(
        [url], batch_size=1, decode_size=100, transform=lambda im: sizes.append(im.size) or torch.zeros(1)
    )
    assert sizes == [(128, 128)] and batch.keys == ["a"]
    with pytest.raises(ValueError, match="decode_size must be >= 1 or None, got 0"):
        SuperBatchStream([url], batch_size=1, decode_size=0)


# --- the modules ------------------------------------------------------------------------------------------


def test_the_loader_module_keeps_every_name_as_the_same_object():
    """``jestclip.data.loader`` was the whole loader; its names now live in ``decode``, ``shardlist``,
    ``tarread`` and ``stream``, each in one of them, and ``loader`` re-exports them."""
    from jestclip.data import loader, stream, tarread

    modules = (decode, shardlist, tarread, stream)
    for name in loader.__all__:
        (home,) = [m for m in modules if name in m.__all__]
        assert getattr(loader, name) is getattr(home, name), name


def test_every_skip_reason_is_listed_once_with_the_code_that_counts_it():
    from jestclip.data import stream, tarread

    reasons = stream.SKIP_REASONS
    assert reasons == tarread.READ_REASONS + decode.DECODE_REASONS + stream.STREAM_REASONS
    assert len(set(reasons)) == len(reasons) and set(stream.SHARD_REASONS) <= set(reasons)
