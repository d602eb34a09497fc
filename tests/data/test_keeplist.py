"""The keep list of the static filter: written from a reference cache, checked, applied by the stream."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from jestclip.data import SuperBatchStream, decode_sample
from jestclip.data.keeplist import DIGESTS, HEADER, KEYS, KeepList, KeptSampleChangedError, filter_shards
from jestclip.data.refcache import CacheMeta, SidecarError, shard_content, shard_keys, write_sidecar
from jestclip.data.stream import ResumableBatches
from jestclip.selection import Embeddings, independent_select

from .test_loader import add_members, make_shards, resumed_after
from .test_refcache import rewrite_same_keys_and_size

DIM = 8


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def cached(
    root: Path, *, bad_image: bool = False, cache_dir: Path | None = None
) -> tuple[list[str], dict[str, tuple]]:
    """3 shards of 8 with random reference embeddings cached next to them; {key: (image, text)} as stored.
    bad_image: shard 1 also holds ``zz_bad``, whose image does not decode, cached with cosine 1 (always
    kept by the similarity score). cache_dir: the shards are read as ``pipe:cat PATH`` (URLs; their urls
    are returned) and cached in this directory."""
    urls = make_shards(root, 3, 8)
    if bad_image:
        add_members(Path(urls[1]), {"zz_bad.png": b"not a png", "zz_bad.txt": b"caption"})
    rows = {}
    for s, url in enumerate(urls):
        keys = sorted(shard_keys(url))
        image, text = unit_rows(len(keys), 2 * s), unit_rows(len(keys), 2 * s + 1)
        if "zz_bad" in keys:
            text[keys.index("zz_bad")] = image[keys.index("zz_bad")]
        meta = CacheMeta("fp", "toy", 10.0, -5.0, DIM, None if cache_dir else os.path.getsize(url))
        shard = f"pipe:cat {url}" if cache_dir else url
        write_sidecar(shard, "reference", keys, image, text, meta, cache_dir=cache_dir)
        rows |= {k: (image[i], text[i]) for i, k in enumerate(keys)}
    return ([f"pipe:cat {u}" for u in urls] if cache_dir else urls), rows


@pytest.fixture
def pool(tmp_path) -> tuple[list[str], dict[str, tuple]]:
    return cached(tmp_path / "pool")


def cosine(pair: tuple) -> float:
    return float(np.dot(pair[0].astype(np.float64), pair[1].astype(np.float64)))


def test_the_kept_keys_are_the_pools_top_cosines(tmp_path, pool):
    urls, rows = pool
    header = filter_shards(urls, tmp_path / "keep", keep=0.25, progress=False)
    assert (header["kept"], header["total"], header["score"]) == (6, 24, "similarity")
    assert header["reference"] == {
        "name": "reference",
        "model": "toy",
        "fingerprint": "fp",
        "scale": 10.0,
        "bias": -5.0,
    }
    keys = sorted(rows)
    cosines = torch.tensor([cosine(rows[k]) for k in keys], dtype=torch.float64)
    top = {keys[i] for i in torch.topk(cosines, 6).indices.tolist()}
    kept = KeepList(tmp_path / "keep")
    assert set().union(*(kept.keys(u) for u in urls)) == top
    assert header["threshold"] == pytest.approx(float(torch.topk(cosines, 6).values[-1]), abs=1e-6)
    # the same pairs independent easy-reference top-k selection takes from the pool as one super-batch
    image = torch.tensor(np.stack([rows[k][0] for k in keys]), dtype=torch.float32)
    text = torch.tensor(np.stack([rows[k][1] for k in keys]), dtype=torch.float32)
    easy = independent_select(
        None, Embeddings(image, text, 10.0, -5.0), size=6, scoring="easy_reference", method="topk"
    )
    assert {keys[i] for i in easy.tolist()} == top
    record = json.loads((tmp_path / "keep" / "filter.json").read_text())
    assert record["settings"]["keep"] == 0.25 and record["result"]["kept"] == 6
    on_disk = json.loads((tmp_path / "keep" / HEADER).read_text())
    assert [s["url"] for s in on_disk["shards"]] == [os.path.abspath(u) for u in urls]
    assert sum(s["kept"] for s in on_disk["shards"]) == 6 and {s["total"] for s in on_disk["shards"]} == {8}


def test_a_shard_under_two_names_is_scored_and_kept_once(tmp_path, pool):
    urls, _ = pool
    root = Path(urls[0]).parent
    os.symlink(urls[0], root / "zz-link.tar")
    header = filter_shards(root, tmp_path / "keep", keep=0.5, progress=False)
    assert (header["kept"], header["total"]) == (12, 24)  # 00000 twice: 16 of 32
    kept = KeepList(tmp_path / "keep")
    kept.check([str(root)])  # was: "shard .../zz-link.tar ... is not in it"
    stream = SuperBatchStream(root, batch_size=100, keep=kept, shuffle_shards=False)
    (batch,) = list(stream)
    assert len(batch) == len(set(batch.keys)) == 12 and batch.skipped["duplicate_shard"] == 1


def test_keep_fraction_one_keeps_every_pair_and_the_loss_score_is_recorded(tmp_path, pool):
    urls, _ = pool
    header = filter_shards(
        urls, tmp_path / "all", keep=1.0, score="loss", batch_size=5, seed=3, progress=False
    )
    assert (header["kept"], header["total"]) == (24, 24)
    assert (header["loss"], header["batch_size"], header["seed"]) == ("sigmoid", 5, 3)
    kept = KeepList(tmp_path / "all")
    assert all(kept.keys(u) == shard_keys(u) for u in urls)


def test_the_stream_reads_only_kept_samples_and_counts_the_rest(tmp_path, pool, monkeypatch):
    urls, _ = pool
    filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    kept = KeepList(tmp_path / "keep")
    kept.check(urls)
    decoded = []
    real = decode_sample
    monkeypatch.setattr(
        "jestclip.data.stream.decode_sample",
        lambda raw, **kw: decoded.append(raw["__key__"]) or real(raw, **kw),
    )
    batches = list(SuperBatchStream(urls, batch_size=5, shuffle_shards=False, keep=kept))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(set().union(*(kept.keys(u) for u in urls))) and len(keys) == 12
    assert decoded == keys  # the others were never decoded
    assert sum((Counter(b.skipped) for b in batches), Counter()) == {"not_kept": 12}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_filtered_stream_equals_the_uninterrupted_one(tmp_path, workers):
    urls, _ = cached(tmp_path / "pool", bad_image=True)
    filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    kw = {"batch_size": 2, "resampled": True, "seed": 3, "keep": KeepList(tmp_path / "keep")}
    whole = ResumableBatches(SuperBatchStream(urls, **kw), workers)
    expected = [next(whole) for _ in range(9)]
    assert {reason for b in expected for reason in b.skipped} == {"not_kept", "bad_image"}
    for stop in (1, 2, 4, 7):
        got = resumed_after(urls, kw, workers, stop, 9)
        assert [b.keys for b in got] == [b.keys for b in expected], stop
        assert [b.skipped for b in got] == [b.skipped for b in expected], stop
        assert [b.position for b in got] == [b.position for b in expected], stop


def test_a_keep_list_pickles_without_its_loaded_keys(tmp_path, pool):
    urls, _ = pool
    filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    kept = KeepList(tmp_path / "keep")
    first = kept.keys(urls[0])
    copy = pickle.loads(pickle.dumps(kept))
    assert copy._current is None and copy.keys(urls[0]) == first


def test_a_keep_list_for_other_shards_is_one_line(tmp_path, pool):
    urls, _ = pool
    filter_shards(urls[:2], tmp_path / "two", keep=0.5, progress=False)
    with pytest.raises(ValueError, match=rf"was written for other shards: shard {urls[2]} \(1 of 3 such\)"):
        KeepList(tmp_path / "two").check(urls)
    filter_shards(urls, tmp_path / "three", keep=0.5, progress=False)
    with pytest.raises(ValueError, match=rf"its shard {os.path.abspath(urls[2])} \(1 such\) is not among"):
        KeepList(tmp_path / "three").check(urls[:2])
    add_members(Path(urls[0]), {"late.txt": b"x" * 20000})  # past the tar record padding: a new size
    with pytest.raises(ValueError, match=rf"shard {urls[0]} changed since keep list .* bytes then"):
        KeepList(tmp_path / "three").check(urls)


def test_a_kept_key_the_shard_does_not_hold_is_named(tmp_path, pool):
    urls, _ = pool
    filter_shards(urls, tmp_path / "keep", keep=1.0, progress=False)
    header = json.loads((tmp_path / "keep" / HEADER).read_text())
    keys = np.load(tmp_path / "keep" / KEYS)
    keys[0] = b"s0_999"  # same width: the file keeps its size
    np.save(tmp_path / "keep" / KEYS, keys)
    assert json.loads((tmp_path / "keep" / HEADER).read_text()) == header
    keep = KeepList(tmp_path / "keep")
    keep.check(urls)  # startup reads no shard (a stat each): the check is where the shard is read
    stream = SuperBatchStream(urls, batch_size=4, shuffle_shards=False, keep=keep)
    with pytest.raises(
        KeptSampleChangedError, match=rf"keeps sample key 's0_999' of shard {urls[0]} \(1 such"
    ):
        list(stream)


def test_bad_keep_list_directories_are_named(tmp_path, pool):
    urls, _ = pool
    with pytest.raises(ValueError, match="is not a directory written by `jestclip filter`"):
        KeepList(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no keep\.json"):
        KeepList(tmp_path / "empty")
    filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    shutil.copytree(tmp_path / "keep", tmp_path / "cut")
    with open(tmp_path / "cut" / KEYS, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'cut' / KEYS} is truncated \(100 bytes, expected"):
        KeepList(tmp_path / "cut")
    (tmp_path / "keep" / HEADER).write_text('{"format": "jestclip-keeplist/2"}')
    with pytest.raises(ValueError, match=r"keep.json is corrupt \(KeyError"):
        KeepList(tmp_path / "keep")
    (tmp_path / "keep" / HEADER).write_text('{"format": "jestclip-keeplist/1"}')  # before content digests
    with pytest.raises(
        ValueError,
        match=r"keep\.json is of format jestclip-keeplist/1, without the content digests that show a changed "
        r"shard; run `jestclip filter` again \(format jestclip-keeplist/2\)$",
    ):
        KeepList(tmp_path / "keep")


def test_filter_refuses_to_overwrite_or_to_keep_nothing(tmp_path, pool):
    urls, _ = pool
    filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    before = (tmp_path / "keep" / KEYS).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a keep list"):
        filter_shards(urls, tmp_path / "keep", keep=0.25, progress=False)
    assert (tmp_path / "keep" / KEYS).read_bytes() == before
    with pytest.raises(ValueError, match=r"keep fraction 0\.01 of 24 pairs keeps none"):
        filter_shards(urls, tmp_path / "none", keep=0.01, progress=False)
    assert not (tmp_path / "none" / HEADER).exists()
    with pytest.raises(ValueError, match=r"come from model fp .*not the expected other"):
        filter_shards(urls, tmp_path / "x", keep=0.5, fingerprint="other", progress=False)


# -- stale data: each kept sample's content digest, recorded when written, checked as the stream reads it --


def test_the_keep_list_records_the_content_digest_of_each_kept_sample(tmp_path, pool):
    urls, _ = pool
    filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    keys = [k.decode() for k in np.load(tmp_path / "keep" / KEYS).tolist()]
    digests = np.load(tmp_path / "keep" / DIGESTS)
    assert digests.dtype == np.uint64 and len(digests) == len(keys) == 12
    content = {k: d for url in urls for k, d in shard_content(url).items()}  # the loader's content_digest
    assert dict(zip(keys, digests.tolist(), strict=True)) == {k: content[k] for k in keys}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_rewritten_at_the_same_size_stops_the_stream_at_its_first_kept_sample(
    tmp_path, pool, monkeypatch, workers
):
    urls, _ = pool
    filter_shards(urls, tmp_path / "keep", keep=1.0, progress=False)
    rewrite_same_keys_and_size(urls[1])  # re-rendered and re-captioned: same keys, same byte size
    kept = KeepList(tmp_path / "keep")
    kept.check(urls)  # the startup check reads sizes and tar headers only: it cannot tell
    decoded = []
    real = decode_sample
    monkeypatch.setattr(
        "jestclip.data.stream.decode_sample",
        lambda raw, **kw: decoded.append(raw["__key__"]) or real(raw, **kw),
    )
    stream = SuperBatchStream(urls, batch_size=100, shuffle_shards=False, keep=kept)
    with pytest.raises(KeptSampleChangedError) as info:
        list(ResumableBatches(stream, workers))
    assert str(info.value) == (
        f"shard {urls[1]} changed since keep list {tmp_path / 'keep'} was written: kept sample key 's1_000' "
        "has other image or caption bytes; run `jestclip cache-reference` and `jestclip filter` again"
    )
    assert not [k for k in decoded if k.startswith("s1_")]  # refused before it was decoded
    assert kept(urls[1], "s1_000") and not kept(urls[1], "s1_999")  # membership alone (tar-header counts)


def test_filter_refuses_a_reference_cache_older_than_its_shards(tmp_path, pool):
    urls, _ = pool
    rewrite_same_keys_and_size(urls[2])  # after cache-reference: the cached rows embed the old bytes
    with pytest.raises(
        SidecarError,
        match=rf"^shard {urls[2]} changed since its 'reference' embeddings were cached: sample key 's2_000' "
        r"\(8 of 8 in this batch\) has other image or caption bytes",
    ):
        filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    assert not (tmp_path / "keep" / HEADER).exists()
    # told not to read the pool again (at scale it is as much reading as caching was), the filter records
    # the cache's digests as they are, and the stream stops at the first kept sample of the changed shard
    from jestclip.cli import main

    assert (
        main(["filter", *urls, "--keep", "1.0", "--out", str(tmp_path / "trusted"), "--skip-content-check"])
        == 0
    )
    stream = SuperBatchStream(
        urls[2:], batch_size=4, shuffle_shards=False, keep=KeepList(tmp_path / "trusted")
    )
    with pytest.raises(KeptSampleChangedError, match="kept sample key 's2_000' has other image or caption"):
        list(stream)


# -- shards behind a URL: a cache directory, identities instead of paths and sizes --------------------------


def test_a_keep_list_of_shards_behind_a_url(tmp_path):
    urls, rows = cached(tmp_path / "pool", cache_dir=tmp_path / "cache")
    with pytest.raises(
        ValueError, match=r"shard pipe:cat .*00000\.tar is not a local file, so its 'reference'"
    ):
        filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)
    header = filter_shards(urls, tmp_path / "keep", keep=0.5, cache_dir=tmp_path / "cache", progress=False)
    assert (header["kept"], header["total"]) == (12, 24)
    on_disk = json.loads((tmp_path / "keep" / HEADER).read_text())
    assert [(s["url"], s["bytes"]) for s in on_disk["shards"]] == [(u, None) for u in urls]
    kept = KeepList(tmp_path / "keep")
    kept.check([f"pipe:cat {tmp_path}/pool/{{00000..00002}}.tar"])  # the same URLs, as a brace pattern
    local = [u.removeprefix("pipe:cat ") for u in urls]
    with pytest.raises(ValueError, match=rf"was written for other shards: shard {local[0]} \(3 of 3 such\)"):
        kept.check(local)
    batches = list(SuperBatchStream(urls, batch_size=5, shuffle_shards=False, keep=kept))
    keys = sorted(k for b in batches for k in b.keys)
    top = sorted(rows, key=lambda k: -cosine(rows[k]))[:12]
    assert keys == sorted(top) and {u for b in batches for u in b.urls} <= set(urls)
    rewrite_same_keys_and_size(local[0])
    kept.check(urls)  # no size to compare behind a URL; the digests are
    with pytest.raises(KeptSampleChangedError, match=rf"^shard pipe:cat {local[0]} changed since keep list"):
        list(SuperBatchStream(urls, batch_size=5, shuffle_shards=False, keep=kept))


def test_inspect_shows_the_precision_of_the_reference_that_wrote_a_keep_list(tmp_path, capsys):
    """`jestclip data inspect SHARDS --keep-list DIR`: the ground truth of what a reference keeps — the check
    the README tells users to run on their reference before using it."""
    from PIL import Image

    from jestclip.cli import main
    from jestclip.data.quality import quality_entry
    from jestclip.data.shards import Pair, png_bytes, write_shard

    # k0..k4 clean, k5..k9 swapped; the reference rates k0, k1, k2 (cosine 1) and k5 (0.9) above the rest
    pairs = [
        Pair(
            f"k{i}",
            png_bytes(Image.new("RGB", (4, 4), (i * 20, 0, 0))),
            f"caption {i}",
            {
                "source": "icons",
                "quality": quality_entry(f"caption {i}", []) if i < 5 else quality_entry(None, ["swapped"]),
            },
        )
        for i in range(10)
    ]
    shard = tmp_path / "pool" / "00000.tar"
    shard.parent.mkdir()
    write_shard(shard, pairs)
    keys = sorted(shard_keys(str(shard)))
    image = np.zeros((10, DIM), dtype=np.float16)
    image[:, 0] = 1.0
    text = np.zeros((10, DIM), dtype=np.float16)
    for i, key in enumerate(keys):
        cos = {"k0": 1.0, "k1": 1.0, "k2": 1.0, "k5": 0.9}.get(key, 0.1)
        text[i, 0], text[i, 1] = cos, np.sqrt(1 - cos**2)
    meta = CacheMeta("fp", "toy", 10.0, -5.0, DIM, os.path.getsize(shard))
    write_sidecar(str(shard), "reference", keys, image, text, meta)
    filter_shards([str(shard)], tmp_path / "keep", keep=0.4, progress=False)
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "inspect",
                str(tmp_path / "pool"),
                "--examples",
                "0",
                "--keep-list",
                str(tmp_path / "keep"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"keep list {tmp_path / 'keep'} keeps 4 of 10 pairs" in out
    assert out.strip().splitlines()[-1] == (
        "precision: 75.0% of kept pairs clean against 50.0% of all (lift 1.50); "
        "swapped 25.0% of kept against 50.0%"
    )
    # a keep list written for other shards: one line, exit 2
    other = make_shards(tmp_path / "other", 1, 3)
    assert main(["data", "inspect", other[0], "--examples", "0", "--keep-list", str(tmp_path / "keep")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jestclip data: ") and "keep list" in err and "\n" not in err


def test_the_reference_check_works_on_unlabelled_shards_through_corrupt(tmp_path, capsys):
    """The README's check on a user's own shards: no quality labels, `data corrupt` labels the swapped pairs
    only; the swapped share is over all pairs (before, over the labelled ones: 100% against 100%)."""
    from PIL import Image

    from jestclip.cli import main
    from jestclip.data.shards import Pair, png_bytes, write_shard

    own = tmp_path / "own"
    own.mkdir()
    pairs = [
        Pair(f"k{i}", png_bytes(Image.new("RGB", (4, 4), (i * 20, 0, 0))), f"caption {i}", {})
        for i in range(10)
    ]
    write_shard(own / "00000.tar", pairs)
    assert main(["data", "corrupt", str(own), str(tmp_path / "swap"), "--swap-captions", "0.5"]) == 0
    shard = tmp_path / "swap" / "00000.tar"
    keys = sorted(shard_keys(str(shard)))
    metas = {
        s.key: s.meta for s in SuperBatchStream([str(shard)], batch_size=1, shuffle_shards=False).samples()
    }
    swapped = sorted(k for k in keys if "swapped" in metas[k].get("quality", {}).get("noise", []))
    assert len(swapped) == 5 and all("quality" not in metas[k] for k in keys if k not in swapped)
    # the reference rates every unswapped pair 1.0, one swapped pair 0.95, the other swapped pairs 0.1
    cosines = {k: 0.1 if k in swapped[1:] else 0.95 if k == swapped[0] else 1.0 for k in keys}
    image, text = np.zeros((10, DIM), dtype=np.float16), np.zeros((10, DIM), dtype=np.float16)
    image[:, 0] = 1.0
    for i, key in enumerate(keys):
        text[i, 0], text[i, 1] = cosines[key], np.sqrt(1 - cosines[key] ** 2)
    write_sidecar(
        str(shard), "ref", keys, image, text, CacheMeta("fp", "toy", 10.0, -5.0, DIM, os.path.getsize(shard))
    )
    filter_shards([str(shard)], tmp_path / "keep", keep=0.6, name="ref", progress=False)  # 5 unswapped + 1
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "inspect",
                str(tmp_path / "swap"),
                "--examples",
                "0",
                "--keep-list",
                str(tmp_path / "keep"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == "swapped 16.7% of kept against 50.0%"
