"""Fuzzing the shard decoder: junk images, odd tar members and cut shards never break the stream.

Every sample key in a shard is accounted for: yielded, or counted under a per-sample skip reason.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from jestclip.data import NoReadableSampleError, SuperBatchStream, decode_sample
from jestclip.data.shards import png_bytes
from jestclip.data.stream import SHARD_REASONS, SKIP_REASONS

from .test_loader import within

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLE_REASONS = {
    "truncated_sample",
    "duplicate_key",
    "missing_key",
    "missing_image",
    "bad_image",
    "image_too_large",
    "aspect_ratio_too_large",
    "missing_text",
    "bad_text",
    "empty_text",
    "bad_json",
}


def resize(image: Image.Image) -> Tensor:
    return pil_to_tensor(image.resize((4, 4))).float().div(255.0)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


VALID_IMAGES = [
    png_bytes(Image.new("RGB", (5, 3), (10, 20, 30))),
    encoded(Image.new("L", (2, 7), 99), "PNG"),
    encoded(Image.new("RGBA", (3, 3), (1, 2, 3, 4)), "PNG"),
    encoded(Image.new("P", (4, 4)), "GIF"),
    encoded(Image.new("RGB", (6, 6), (200, 0, 0)), "JPEG"),
    encoded(Image.new("RGB", (3, 5), (0, 200, 0)), "BMP"),
    encoded(Image.new("RGB", (4, 2), (0, 0, 200)), "WEBP"),
]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped and/or its tail cut."""
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
contents = st.one_of(
    st.sampled_from(VALID_IMAGES),
    damaged_images(),
    st.binary(max_size=64),
    st.just(b""),
    st.text(max_size=10).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
)
keys = st.sampled_from(["a", "b", "c", "dir/a", "__meta__"])
# Keys repeat (duplicates); extensions are odd, upper-case or missing; "dir/" is part of a key
names = st.builds(
    lambda key, ext: f"{key}.{ext}" if ext else key,
    keys,
    st.sampled_from(["png", "PNG", "jpg", "jpeg", "webp", "txt", "TXT", "json", "cls", "png.bak", ""]),
)
good_pairs = st.builds(  # a readable sample, so that duplicates of readable samples come up often
    lambda key, image, text: [(f"{key}.png", image, True), (f"{key}.txt", text.encode(), True)],
    keys,
    st.sampled_from(VALID_IMAGES),
    st.text(min_size=1, max_size=5).filter(str.strip),
)
one_member = st.tuples(names, contents, st.booleans()).map(lambda member: [member])
members = st.lists(one_member | good_pairs, max_size=10).map(lambda chunks: [m for c in chunks for m in c])


def write_tar(path: Path, entries: list[tuple[str, bytes, bool]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data, regular in entries:
            info = tarfile.TarInfo(name)
            if regular:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:  # a directory member: not a sample, never read
                info.type = tarfile.DIRTYPE
                tar.addfile(info)


def sample_groups(entries: list[tuple[str, bytes, bool]]) -> list[str]:
    """The keys of the samples in member order, as webdataset groups them (the test's own model)."""
    keys: list[str] = []
    current: set[str] | None = None
    for name, _, regular in entries:
        base, dot, ext = name.rpartition("/")[2].partition(".")
        if not regular or not dot or not base or re.match(r"__[^/]*__($|/)", name):
            continue
        key = name[: len(name) - len(ext) - 1]
        if current is None or key != keys[-1] or ext.lower() in current:
            keys.append(key)
            current = set()
        current.add(ext.lower())
    return keys


def stream_all(url: str, **kw) -> tuple[list, Counter[str]]:
    """Every sample the stream yields from ``url`` and every skip, by reason (summed over its batches)."""
    stream = SuperBatchStream([url], batch_size=3, transform=resize, **kw)
    samples, skipped = [], Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # shards without a readable sample
        for batch in stream:
            assert batch.images.shape == (len(batch), 3, 4, 4)
            assert all(isinstance(t, str) and t.strip() == t and t for t in batch.texts)
            samples += list(zip(batch.keys, batch.texts, strict=True))
            skipped.update(batch.skipped)
        if not samples:  # no batch to carry the skips: read them off the sample stream
            assert list(stream.samples(skipped)) == []
    assert set(skipped) <= set(SKIP_REASONS)  # every reason counted is one listed
    return samples, skipped


@FUZZ
@given(entries=members)
def test_random_members_are_yielded_or_counted(entries):
    with tempfile.TemporaryDirectory() as root:
        url = str(Path(root) / "00000.tar")
        write_tar(Path(url), entries)
        groups = sample_groups(entries)
        try:
            samples, skipped = stream_all(url, require_samples=True)
        except NoReadableSampleError as exn:
            assert str(exn).startswith(f"no readable sample in 1 shards tried: {url} (")
            samples, skipped = stream_all(url)
            assert samples == []
    assert not set(skipped) - SAMPLE_REASONS
    assert len(samples) + sum(skipped.values()) == len(groups)
    keys = [k for k, _ in samples]
    assert len(set(keys)) == len(keys) and set(keys) <= set(groups)


@FUZZ
@given(entries=st.lists(st.tuples(names, contents, st.just(True)), min_size=1, max_size=10), data=st.data())
def test_a_cut_shard_loses_only_its_tail(entries, data):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "00000.tar"
        write_tar(path, entries)
        whole, _ = stream_all(str(path))
        raw = path.read_bytes()
        with tarfile.open(path) as tar:
            infos = tar.getmembers()
        cut = data.draw(st.integers(0, len(raw)))
        path.write_bytes(raw[:cut])
        samples, skipped = stream_all(str(path))
    # a sample "started" once its first member was read in full; it is then yielded or counted
    read = [i for i, m in enumerate(infos) if m.offset_data + m.size <= cut]
    started = len(sample_groups(entries[: (read[-1] + 1) if read else 0]))
    assert samples == whole[: len(samples)]
    assert len(samples) + sum(skipped[r] for r in SAMPLE_REASONS) == started
    last = infos[-1]
    complete = cut >= last.offset_data + -(-last.size // 512) * 512 + 512  # up to the end-of-archive block
    assert sum(skipped[r] for r in SHARD_REASONS) == (0 if complete else 1)
    assert skipped["bad_shard"] == (1 if cut < 512 else 0)


@settings(max_examples=300, deadline=None, database=None)
@given(image=damaged_images() | st.binary(max_size=200), ext=st.sampled_from(["png", "jpg", "webp"]))
def test_decode_sample_never_raises_on_image_bytes(image, ext):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warnings either
        out = decode_sample({"__key__": "k", ext: image, "txt": b"caption"})
    if isinstance(out, str):
        assert out in ("bad_image", "image_too_large", "aspect_ratio_too_large")
    else:
        assert out.image.mode == "RGB" and out.text == "caption"


@pytest.mark.parametrize("resampled", [True, False])
def test_fuzzed_unreadable_shards_raise_only_the_clear_error(tmp_path, resampled):
    urls = []
    for i, data in enumerate([b"", b"\0" * 1024, bytes(range(256)), VALID_IMAGES[0]]):
        urls.append(str(tmp_path / f"{i}.tar"))
        Path(urls[-1]).write_bytes(data)
    stream = SuperBatchStream(urls, batch_size=2, resampled=resampled, epochs=None, transform=resize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with within(10), pytest.raises(NoReadableSampleError, match="in 4 shards tried"):
            next(iter(stream))
