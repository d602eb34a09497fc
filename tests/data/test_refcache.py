"""The reference-embedding cache: memory-mapped sidecars per shard, joined by (shard, key), checked up front
from headers, with one-line errors naming the file when missing, stale, corrupt or truncated."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from jestclip.data import SuperBatchStream, png_bytes, refcache
from jestclip.data.caching import cache_reference
from jestclip.data.refcache import (
    CacheMeta,
    ReferenceCache,
    SidecarError,
    shard_content,
    shard_keys,
    sidecar_path,
    write_sidecar,
)
from jestclip.models import (
    create_model,
    image_transform,
    model_fingerprint,
    reference_embedder,
    reference_logits,
    tokenizer,
)

from .test_loader import add_members, make_shards

TRANSFORM = image_transform("jest-micro")


def cache(model: nn.Module, urls: list[str]) -> dict:
    """cache_reference with ``model``'s embedder and the facts about it the sidecars record."""
    scale, bias = reference_logits(model)
    return cache_reference(
        reference_embedder(model, tokenizer("jest-micro")),
        urls,
        model_name="jest-micro",
        fingerprint=model_fingerprint(model),
        scale=scale,
        bias=bias,
        transform=TRANSFORM,
        batch_size=4,
    )


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    return create_model("jest-micro"), make_shards(tmp_path, 2, 5)


def test_cache_then_lookup_by_key(setup):
    model, urls = setup
    summary = cache(model, urls)
    assert summary["written"] == 2 and summary["samples"] == 10
    assert all(sidecar_path(u, "reference").exists() for u in urls)
    keys = ["s1_004", "s0_000", "s1_002"]
    reference = ReferenceCache(urls, fingerprint=model_fingerprint(model), dim=64)
    emb = reference.lookup(keys, [urls[1], urls[0], urls[1]])
    without_urls = reference.lookup(keys)  # searched in every shard
    torch.testing.assert_close(without_urls.image, emb.image, atol=0, rtol=0)
    assert (
        emb.image.shape == (3, 64) and emb.scale == pytest.approx(10.0) and emb.bias == pytest.approx(-10.0)
    )
    # the same as embedding those samples directly (up to float16 storage)
    samples = {
        s.key: s
        for s in SuperBatchStream(urls, batch_size=1, shuffle_shards=False, transform=TRANSFORM).samples()
    }
    tokenize = tokenizer("jest-micro")
    with torch.no_grad():
        direct = F.normalize(model.eval().encode_image(torch.stack([samples[k].image for k in keys])), dim=-1)
        text = F.normalize(model.encode_text(tokenize([samples[k].text for k in keys])), dim=-1)
    torch.testing.assert_close(emb.image, direct, atol=2e-3, rtol=0)
    torch.testing.assert_close(emb.text, text, atol=2e-3, rtol=0)


def test_a_shard_under_two_names_is_cached_once_and_found_under_either(setup, tmp_path):
    import os

    model, urls = setup
    os.symlink(urls[0], tmp_path / "zz-link.tar")
    summary = cache(model, [str(tmp_path / "." / "00001.tar"), str(tmp_path)])
    assert summary["written"] == 2 and summary["samples"] == 10  # it cached 00000 twice: 3 and 15
    assert summary["skipped"] == {"duplicate_shard": 2}
    assert not sidecar_path(tmp_path / "zz-link.tar", "reference").exists()
    reference = ReferenceCache(tmp_path)
    assert reference.urls == urls
    emb = reference.lookup(["s0_001", "s0_001"], [str(tmp_path / "zz-link.tar"), urls[0]])
    torch.testing.assert_close(emb.image[0], emb.image[1], atol=0, rtol=0)


def test_cache_resumes_and_recomputes_for_another_model(setup):
    model, urls = setup
    cache(model, urls)
    assert cache(model, urls)["kept"] == 2
    assert cache(create_model("jest-micro"), urls)["written"] == 2


def test_stale_or_missing_caches_are_clear_errors(setup, tmp_path):
    model, urls = setup
    with pytest.raises(ValueError, match=r"no cached 'reference' embeddings for shard .*00000\.tar"):
        ReferenceCache(urls)
    cache(model, urls)
    with pytest.raises(ValueError, match="not the expected deadbeef"):
        ReferenceCache(urls, fingerprint="deadbeef")
    with pytest.raises(ValueError, match="have dim 64, expected 128"):
        ReferenceCache(urls, dim=128)
    with pytest.raises(
        ValueError, match=r"sample key 'nope' of shard .*00001\.tar has no cached 'reference'"
    ):
        ReferenceCache(urls).lookup(["s0_000", "nope"], [urls[0], urls[1]])
    with pytest.raises(ValueError, match="sample key 'nope' has no cached 'reference' embedding in any of 2"):
        ReferenceCache(urls).lookup(["s0_000", "nope"])
    with pytest.raises(
        ValueError, match=r"comes from shard .*00001\.tar, which this 'reference' cache was not"
    ):
        ReferenceCache(urls[:1]).lookup(["s0_000", "s1_000"], urls)
    cache(create_model("jest-micro"), urls[1:])
    with pytest.raises(ValueError, match="differ from those of"):
        ReferenceCache(urls)
    with open(urls[0], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="changed since its 'reference' embeddings were cached"):
        ReferenceCache(urls[:1])


def test_sidecar_format_is_sorted_keys_and_memory_mappable_float16(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    toy_cache([url])
    keys = np.load(refcache._array_path(url, "reference", "keys"), mmap_mode="r", allow_pickle=False)
    emb = np.load(refcache._array_path(url, "reference", "emb"), mmap_mode="r", allow_pickle=False)
    assert keys.tolist() == [b"s0_000", b"s0_001", b"s0_002"] and isinstance(emb, np.memmap)
    assert emb.dtype == np.float16 and emb.shape == (3, 2, 3)
    header = json.loads(sidecar_path(url, "reference").read_text())
    assert header["format"] == "jestclip-refcache/3" and header["finite"] is True and header["rows"] == 3
    assert sidecar_path(url, "reference").name == "00000.reference.json"
    assert header["shard"] == str(Path(url).resolve())
    # row i's content digest is that of keys[i]'s image and caption bytes as the loader reads them
    digest = np.load(refcache._array_path(url, "reference", "digest"), allow_pickle=False)
    content = shard_content(url)
    assert digest.dtype == np.uint64 and digest.tolist() == [content[k.decode()] for k in keys.tolist()]


def test_any_embedding_function_can_be_cached(tmp_path):
    # no model at all: a function of the captions, returned in bfloat16, stored as float16
    urls = make_shards(tmp_path, 1, 3)

    def embed(images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = F.normalize(torch.tensor([[1.0, float(len(t)), 0.0] for t in texts]), dim=-1)
        return rows.bfloat16(), rows.flip(-1).bfloat16()

    summary = cache_reference(
        embed, urls, model_name="toy", fingerprint="toy", scale=5.0, bias=-1.0, transform=TRANSFORM
    )
    assert summary["samples"] == 3
    emb = ReferenceCache(urls, fingerprint="toy", dim=3).lookup(["s0_002"])
    assert emb.image.dtype == torch.float32 and (emb.scale, emb.bias) == (5.0, -1.0)
    torch.testing.assert_close(emb.image.flip(-1), emb.text)
    torch.testing.assert_close(emb.image.norm(dim=-1), torch.ones(1), atol=1e-2, rtol=0)


def test_embeddings_of_the_wrong_shape_or_norm_are_refused(tmp_path):
    urls = make_shards(tmp_path, 1, 3)
    args = dict(model_name="toy", fingerprint="toy", scale=1.0, bias=0.0, transform=TRANSFORM)
    with pytest.raises(ValueError, match="expected two"):
        cache_reference(lambda images, texts: (torch.ones(1, 4), torch.ones(1, 4)), urls, **args)
    with pytest.raises(ValueError, match="image embeddings that are not L2-normalised"):
        cache_reference(lambda images, texts: (torch.ones(len(texts), 4),) * 2, urls, **args)
    assert not sidecar_path(urls[0], "reference").exists()


# -- helpers for the tests below: a model-free embedder (a function of the caption) -----------------------


def toy_embed(images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
    rows = F.normalize(torch.tensor([[1.0, float(sum(map(ord, t)) % 97), 0.5] for t in texts]), dim=-1)
    return rows, rows.flip(-1)


def toy_cache(urls: list[str], embed=toy_embed, **kw) -> dict:
    args = dict(model_name="toy", fingerprint="toy", scale=5.0, bias=-1.0, transform=TRANSFORM) | kw
    return cache_reference(embed, urls, **args)


def toy_meta(dim: int = 3, shard_bytes: int = 0, **kw) -> CacheMeta:
    return CacheMeta(
        **(dict(fingerprint="toy", model="toy", scale=5.0, bias=-1.0, dim=dim) | kw), shard_bytes=shard_bytes
    )


def unit_rows(n: int, dim: int = 3, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


# -- 1. up-front validation: keys, dims, finiteness, agreement ---------------------------------------------


def test_undecodable_samples_are_recorded_as_skipped_and_named_at_lookup(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    add_members(Path(url), {"badimg.png": b"not a png", "badimg.txt": b"caption"})
    toy_cache([url])
    header = json.loads(sidecar_path(url, "reference").read_text())
    assert header["skipped_keys"] == ["badimg"] and header["rows"] == 3
    reference = ReferenceCache([url], check_keys=True)  # every shard key has a row or is recorded skipped
    with pytest.raises(ValueError, match=r"sample key 'badimg' of shard .* it was skipped as undecodable"):
        reference.lookup(["s0_000", "badimg"], [url, url])


def test_shard_keys_without_a_row_are_found_by_the_key_check(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    assert set(shard_content(url)) == {"s0_000", "s0_001", "s0_002"}
    size = Path(url).stat().st_size
    write_sidecar(
        url,
        "reference",
        ["s0_000", "s0_001"],
        *[unit_rows(2)] * 2,
        toy_meta(shard_bytes=size),
        digests=[0, 0],
    )
    ReferenceCache([url])  # headers only: the shard's size is unchanged
    with pytest.raises(
        SidecarError, match=r"shard .*00000\.tar holds sample key 's0_002' \(1 such\) that its"
    ):
        ReferenceCache([url], check_keys=True)
    write_sidecar(
        url,
        "reference",
        ["s0_000", "s0_001", "s0_002", "zz"],
        *[unit_rows(4)] * 2,
        toy_meta(shard_bytes=size),
        digests=[0] * 4,
    )
    with pytest.raises(SidecarError, match=r"has a row for sample key 'zz' .* that shard"):
        ReferenceCache([url], check_keys=True)
    # cache-reference compares keys when it resumes, and rewrites a sidecar keyed unlike its shard
    summary = toy_cache([url])
    assert summary["repaired"] == 1 and summary["written"] == 1 and summary["kept"] == 0
    assert len(ReferenceCache([url], check_keys=True)) == 3


def test_non_finite_embeddings_are_refused_when_written(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)

    def nan_for_the_second(images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        image, text = toy_embed(images, texts)
        image[1] = float("nan")
        return image, text

    with pytest.raises(
        ValueError, match=r"non-finite image embedding for sample key 's0_001' of shard .*00000"
    ):
        toy_cache([url], embed=nan_for_the_second, batch_size=8)
    image = unit_rows(2)
    image[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"non-finite embedding for sample key 'b' of shard"):
        write_sidecar(url, "reference", ["a", "b"], image, unit_rows(2), toy_meta(), digests=[0, 0])
    assert not sidecar_path(url, "reference").exists()
    # a header that does not record the check is refused without reading the arrays
    toy_cache([url])
    path = sidecar_path(url, "reference")
    path.write_text(path.read_text().replace('"finite": true', '"finite": false'))
    with pytest.raises(SidecarError, match="does not record its embeddings as checked finite"):
        ReferenceCache([url])


def test_sidecars_must_agree_on_model_dim_scale_and_bias(tmp_path):
    urls = make_shards(tmp_path, 2, 2)
    toy_cache(urls[:1])
    toy_cache(urls[1:], scale=7.0)  # same fingerprint, another scale
    with pytest.raises(
        ValueError, match=r"embeddings of .*00001\.tar \(model toy, dim 3, scale 7, bias -1\) differ"
    ):
        ReferenceCache(urls)
    size = Path(urls[1]).stat().st_size
    keys = ["s1_000", "s1_001"]
    write_sidecar(
        urls[1], "reference", keys, unit_rows(2, 4), unit_rows(2, 4), toy_meta(4, size), digests=[0, 0]
    )
    with pytest.raises(ValueError, match="dim 4, scale 5, bias -1\\) differ from those of"):
        ReferenceCache(urls)


# -- 2. corrupt and truncated sidecars: named in one line, repaired by cache-reference ---------------------


def error_line(shards: list[str], **kw) -> str:
    with pytest.raises(SidecarError) as info:
        ReferenceCache(shards, **kw).lookup(["s0_000"], [shards[0]])
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_corrupt_or_truncated_sidecar_is_named_in_one_line(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    toy_cache([url])
    header, emb = sidecar_path(url, "reference"), refcache._array_path(url, "reference", "emb")
    good = emb.read_bytes()
    emb.write_bytes(good[:-100])
    assert error_line([url]).startswith(f"{emb} is truncated ({len(good) - 100} bytes, expected {len(good)})")
    emb.write_bytes(b"\0" * len(good))  # the right size, but not an array (read when first looked up)
    assert error_line([url]).startswith(f"{emb} is corrupt (ValueError")
    emb.write_bytes(good)
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    assert error_line([url]).startswith(f"{header} is corrupt (JSONDecodeError")
    header.write_text(text.replace('"rows": 3', '"rows": 300'))
    assert f"{header} is corrupt: a keys file of" in error_line([url])
    header.write_text(text)
    refcache._array_path(url, "reference", "keys").unlink()
    assert "reference.keys.npy is truncated (missing)" in error_line([url])
    assert "cache-reference" in error_line([url])


def test_cache_reference_repairs_corrupt_and_truncated_sidecars(tmp_path, capsys):
    urls = make_shards(tmp_path, 3, 3)
    toy_cache(urls)
    before = ReferenceCache(urls).lookup(["s1_001", "s2_002"], [urls[1], urls[2]])
    sidecar_path(urls[0], "reference").write_text("{not json")
    emb = refcache._array_path(urls[1], "reference", "emb")
    emb.write_bytes(emb.read_bytes()[:-10])
    summary = toy_cache(urls)
    assert (summary["written"], summary["repaired"], summary["kept"]) == (2, 1 + 1, 1)
    err = capsys.readouterr().err
    assert (
        f"rewriting: {sidecar_path(urls[0], 'reference')} is corrupt" in err
        and f"rewriting: {emb} is truncated" in err
    )
    after = ReferenceCache(urls, check_keys=True).lookup(["s1_001", "s2_002"], [urls[1], urls[2]])
    torch.testing.assert_close(after.image, before.image, atol=0, rtol=0)
    assert toy_cache(urls)["kept"] == 3


def test_a_killed_writer_leaves_no_header(tmp_path, monkeypatch):
    (url,) = make_shards(tmp_path, 1, 3)
    toy_cache([url])

    def disk_full(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(refcache.np, "save", disk_full)
    with pytest.raises(OSError):
        toy_cache([url], fingerprint="another")
    monkeypatch.undo()
    with pytest.raises(SidecarError, match="no cached 'reference' embeddings for shard"):
        ReferenceCache([url])
    assert toy_cache([url])["written"] == 1


def test_old_npz_sidecars_are_refused_and_replaced(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    old = Path(url).with_name("00000.reference.npz")
    np.savez(old, keys=np.array(["s0_000"]), meta=np.array("{}"))
    with pytest.raises(
        ValueError,
        match=r"00000\.reference\.npz is an old-format 'reference' cache .*re-run `jestclip cache-reference`",
    ):
        ReferenceCache([url])
    assert toy_cache([url])["written"] == 1 and not old.exists()
    assert len(ReferenceCache([url])) == 3


# -- 3. at scale: headers only when opened, lazy per-shard memory maps, lookup by (shard, key) -------------


def test_opening_reads_headers_only_and_maps_shards_lazily(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, 3, 2)
    toy_cache(urls)
    loads = []
    real_load = np.load
    monkeypatch.setattr(
        refcache.np, "load", lambda path, **kw: loads.append(Path(path).name) or real_load(path, **kw)
    )
    reference = ReferenceCache(urls, max_open=1)
    assert loads == [] and len(reference) == 6
    reference.lookup(["s2_001", "s2_000"], [urls[2], urls[2]])
    assert loads == ["00002.reference.keys.npy", "00002.reference.emb.npy", "00002.reference.digest.npy"]
    reference.lookup(["s0_001"], [urls[0]])
    assert list(reference._open) == [0]  # at most max_open shards stay mapped


def test_lookup_joins_by_shard_and_key(tmp_path):
    urls = make_shards(tmp_path, 2, 2)
    sizes = [Path(u).stat().st_size for u in urls]
    image = unit_rows(6, 4, seed=1)
    # the same key in both shards with different rows; shard 1's keys are written unsorted
    write_sidecar(
        urls[0], "reference", ["same", "a"], *[image[:2]] * 2, toy_meta(4, sizes[0]), digests=[0] * 2
    )
    keys = ["zz", "same", "b", "c"]
    write_sidecar(urls[1], "reference", keys, *[image[2:]] * 2, toy_meta(4, sizes[1]), digests=[0] * 4)
    reference = ReferenceCache(urls)
    keys, shards = ["same", "c", "same", "zz", "a"], [urls[1], urls[1], urls[0], urls[1], urls[0]]
    emb = reference.lookup(keys, shards, check_content=False)  # synthetic rows, not the shards' samples
    expected = torch.from_numpy(image[[3, 5, 0, 2, 1]]).float()
    torch.testing.assert_close(emb.image, expected, atol=0, rtol=0)
    torch.testing.assert_close(emb.text, expected, atol=0, rtol=0)
    assert emb.image.dtype == torch.float32 and (emb.scale, emb.bias) == (5.0, -1.0)
    assert reference.lookup([], [], check_content=False).image.shape == (0, 4)
    with pytest.raises(ValueError, match="lookup got 2 keys but 1 shard urls"):
        reference.lookup(["a", "b"], urls[:1])


def test_the_training_loop_passes_shard_urls(monkeypatch):
    from jestclip.train import startup

    seen = []

    class Recorder:
        def lookup(self, keys, urls=None, *, digests=None, device="cpu"):
            seen.append((keys, urls, digests))

    batch = SimpleNamespace(
        keys=["k"], urls=["u.tar"], images=torch.zeros(1, 3, 2, 2), texts=["t"], digests=[7], meta=[{}]
    )
    startup.to_device(
        batch, lambda texts: torch.zeros(1, 2, dtype=torch.long), Recorder(), torch.device("cpu")
    )
    assert seen == [(["k"], ["u.tar"], [7])]  # the content digests too: a changed sample is caught


def test_memory_maps_read_only_the_pages_asked_for(tmp_path, monkeypatch):
    # without MADV_RANDOM a page fault reads the whole read-ahead window (MiBs) around it: a cache larger
    # than RAM read 27 GB per random lookup; a dense run of rows is asked for ahead, in bulk (MADV_WILLNEED)
    (url,) = make_shards(tmp_path, 1, 2)
    size = Path(url).stat().st_size
    keys = [f"k{i:03d}" for i in range(100)]
    meta = toy_meta(shard_bytes=size)
    write_sidecar(url, "reference", keys, unit_rows(100), unit_rows(100), meta, digests=[0] * 100)
    advised = []
    real = refcache._advise
    monkeypatch.setattr(
        refcache,
        "_advise",
        lambda emb, advice, rows=None: advised.append((advice, rows)) or real(emb, advice, rows),
    )
    reference = ReferenceCache([url])
    reference.lookup(keys[:3], [url] * 3, check_content=False)  # synthetic rows, not the shard's samples
    assert advised == [(mmap.MADV_RANDOM, None)]
    reference.lookup(keys[10:90], [url] * 80, check_content=False)
    assert advised[1:] == [(mmap.MADV_WILLNEED, (10, 90))]


def test_a_sidecar_of_the_same_weights_under_another_preprocessing_is_rewritten(tmp_path):
    """`cache-reference --pretrained TAG` records the model as NAME@TAG: the same weights cached with other
    preprocessing (another tag, or none) are stale, not kept."""
    urls = make_shards(tmp_path, 1, 4)
    first = toy_cache(urls)
    again = toy_cache(urls)
    other = toy_cache(urls, model_name="toy@tag")
    assert (first["written"], again["kept"], other["written"]) == (1, 1, 1)


# -- 4. a shard rewritten in place: caught at lookup by content digest, re-cached by cache-reference -------


def rewrite_same_keys_and_size(url: str) -> None:
    """The issue's case: the shard re-rendered and re-captioned, same keys, same byte size."""
    with tarfile.open(url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    size = Path(url).stat().st_size
    with tarfile.open(url, "w") as tar:
        for member, data in members:
            if member.name.endswith(".png"):
                data = png_bytes(Image.new("RGB", (8, 8), (250, 250, 250)))  # a new image (512-byte blocks)
            elif member.name.endswith(".txt"):
                data = data.decode().upper().encode()  # a new caption of the same length
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert Path(url).stat().st_size == size


def batch_of(urls: list[str]):
    (batch,) = list(SuperBatchStream(urls, batch_size=100, transform=TRANSFORM, shuffle_shards=False))
    return batch


def test_a_shard_rewritten_with_the_same_keys_and_size_is_caught_and_recached(tmp_path, capsys):
    urls = make_shards(tmp_path, 2, 3)
    assert toy_cache(urls)["written"] == 2
    rewrite_same_keys_and_size(urls[0])
    batch = batch_of(urls)
    reference = ReferenceCache(urls)  # headers only: keys and size are unchanged
    with pytest.raises(SidecarError) as info:
        reference.lookup(batch.keys, batch.urls, digests=batch.digests)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"shard {urls[0]} changed since its 'reference' embeddings were cached: sample key 's0_000' (3 of 3 "
        "in this batch) has other image or caption bytes"
    )
    assert message.endswith("; run cache-reference")
    with pytest.raises(SidecarError, match=r"shard .*00000\.tar changed since .* 's0_000' \(3 of 3\)"):
        ReferenceCache(urls, check_keys=True)  # the full check reads the shard
    # cache-reference rewrote nothing before ("kept": 2); now it re-embeds the changed shard only
    summary = toy_cache(urls)
    assert (summary["written"], summary["changed"], summary["kept"]) == (1, 1, 1)
    assert "rewriting: shard" in capsys.readouterr().err
    fresh = ReferenceCache(urls).lookup(batch.keys, batch.urls, digests=batch.digests)
    image, text = toy_embed(batch.images, batch.texts)
    torch.testing.assert_close(fresh.image, image.half().float(), atol=0, rtol=0)
    torch.testing.assert_close(fresh.text, text.half().float(), atol=0, rtol=0)


def test_a_lookup_without_digests_checks_the_content_unless_told_not_to(tmp_path):
    """The content check was opt-in: ``lookup(keys, urls)`` without ``digests=`` served the stale
    embeddings of a rewritten shard with no message."""
    urls = make_shards(tmp_path, 2, 3)
    toy_cache(urls)
    before = ReferenceCache(urls).lookup(["s0_000"], [urls[0]])  # reads shard 0 once, no decoding
    rewrite_same_keys_and_size(urls[0])
    reference = ReferenceCache(urls)
    with pytest.raises(SidecarError, match=r"shard .*00000\.tar changed since .* 's0_000' \(3 of 3\)"):
        reference.lookup(["s0_000"], [urls[0]])
    with pytest.raises(SidecarError, match="changed since"):
        reference.lookup(["s0_001"])  # searched in every shard: checked all the same
    assert reference.lookup(["s1_000"], [urls[1]]).image.shape == (1, 3)  # shard 1 is as cached
    stale = reference.lookup(["s0_000"], [urls[0]], check_content=False)  # said explicitly: served as cached
    torch.testing.assert_close(stale.image, before.image, atol=0, rtol=0)
    reads = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(refcache, "shard_content", lambda url: reads.append(url) or shard_content(url))
    try:
        fresh = ReferenceCache(urls[1:])
        for _ in range(3):
            fresh.lookup(["s1_000", "s1_002"], [urls[1]] * 2)
    finally:
        monkey.undo()
    assert reads == [urls[1]]  # once per shard, not per lookup


def damage_rows(url: str, rows: list[int], value: float = float("nan")) -> None:
    """Write ``value`` into the image embedding of ``rows`` of a sidecar in place: size, header unchanged."""
    path = Path(url).with_name(Path(url).stem + ".reference.emb.npy")
    size = path.stat().st_size
    emb = np.load(path, mmap_mode="r+")
    for row in rows:
        emb[row, 0, 1] = value
    emb.flush()
    del emb
    assert path.stat().st_size == size


def test_a_sidecar_damaged_after_it_was_written_is_named_where_it_is_used_and_repaired(tmp_path, capsys):
    """Four rows set to NaN in place: never named; cache-reference (the documented repair) kept it, DRRho
    skipped its updates and ended "training diverged", the filter's line gave a pool index."""
    urls = make_shards(tmp_path, 2, 3)
    toy_cache(urls)
    damage_rows(urls[1], [0, 2])
    damage_rows(urls[0], [1], float("inf"))
    reference = ReferenceCache(urls)  # headers and sizes are unchanged
    batch = batch_of(urls)
    with pytest.raises(SidecarError) as info:
        reference.lookup(batch.keys, batch.urls, digests=batch.digests)
    assert str(info.value) == (
        f"the cached 'reference' embedding of sample key 's0_001' of shard {urls[0]} is not finite (3 of 6 "
        f"in this lookup): {tmp_path}/00000.reference.emb.npy was damaged after it was written; run "
        "`jestclip cache-reference` on the shard to rewrite it (it repairs damaged sidecars)"
    )
    with pytest.raises(SidecarError, match=r"key 's1_000' of shard .*00001\.tar is not finite \(1 of 1"):
        reference.lookup(["s1_000"], [urls[1]], check_content=False)
    assert reference.lookup(["s1_001"], [urls[1]]).image.isfinite().all()  # its other rows are served
    from jestclip.data.keeplist import filter_shards

    with pytest.raises(SidecarError, match=r"key 's0_001' of shard .*00000\.tar is not finite"):
        filter_shards(urls, tmp_path / "keep", keep=0.5, progress=False)  # named, not a pool index
    summary = toy_cache(urls)  # it kept both: "kept": 2
    assert (summary["written"], summary["repaired"], summary["kept"]) == (2, 2, 0)
    assert "is not finite" in capsys.readouterr().err
    fresh = ReferenceCache(urls).lookup(batch.keys, batch.urls, digests=batch.digests)
    image, _ = toy_embed(batch.images, batch.texts)
    torch.testing.assert_close(fresh.image, image.half().float(), atol=0, rtol=0)


def test_a_skipped_sample_that_became_readable_is_a_change(tmp_path):
    (url,) = make_shards(tmp_path, 1, 2)
    add_members(Path(url), {"late.png": b"not yet a png", "late.txt": b"caption"})
    toy_cache([url])
    data = Path(url).read_bytes()
    fixed = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))
    with tarfile.open(url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(url, "w") as tar:
        for member, body in members:
            body = fixed if member.name == "late.png" else body
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    assert Path(url).read_bytes() != data and len(Path(url).read_bytes()) == len(data)
    summary = toy_cache([url])
    assert summary["changed"] == 1 and len(ReferenceCache([url])) == 3


def test_a_sidecar_without_content_digests_is_refused_and_rewritten(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    toy_cache([url])
    path = sidecar_path(url, "reference")
    path.write_text(path.read_text().replace("jestclip-refcache/3", "jestclip-refcache/2"))
    with pytest.raises(SidecarError) as info:
        ReferenceCache([url])
    assert str(info.value) == (
        f"{path} is a 'reference' cache of format jestclip-refcache/2, without the content digests that show "
        "a changed shard; re-run `jestclip cache-reference` to rewrite it (format jestclip-refcache/3)"
    )
    summary = toy_cache([url])
    assert (summary["written"], summary["repaired"]) == (1, 0)
    assert len(ReferenceCache([url])) == 3


# -- 5. shards behind a URL: a cache directory keyed by the shard's identity ------------------------------


def test_shards_behind_a_url_are_cached_in_a_cache_directory(tmp_path):
    local = make_shards(tmp_path, 2, 3)
    pattern = f"pipe:cat {tmp_path}/{{00000..00001}}.tar"
    with pytest.raises(ValueError) as info:  # the "No such file or directory", now said up front
        toy_cache([pattern])
    assert str(info.value) == (
        f"shard pipe:cat {local[0]} is not a local file, so its 'reference' sidecars cannot sit beside it; "
        "name a cache directory that every rank can read (cache-reference --cache-dir DIR; in training "
        "reference_cache_dir=DIR)"
    )
    cache_dir = tmp_path / "cache"
    summary = toy_cache([pattern], cache_dir=cache_dir)
    assert (summary["written"], summary["samples"]) == (2, 6)
    urls = [f"pipe:cat {u}" for u in local]
    digest = hashlib.sha256(urls[0].encode()).hexdigest()[:16]
    assert sidecar_path(urls[0], "reference", cache_dir) == cache_dir / f"00000-{digest}.reference.json"
    assert len(list(cache_dir.iterdir())) == 8 and not list(Path(local[0]).parent.glob("*.reference.*"))
    assert toy_cache([pattern], cache_dir=cache_dir)["kept"] == 2  # resumable: the shards are re-read
    # training reads them through the same URLs
    batch = batch_of(urls)
    assert batch.urls[0] == urls[0]
    emb = ReferenceCache(urls, cache_dir=cache_dir).lookup(batch.keys, batch.urls, digests=batch.digests)
    image, _ = toy_embed(batch.images, batch.texts)
    torch.testing.assert_close(emb.image, image.half().float(), atol=0, rtol=0)
    # a URL shard rewritten is caught by its digests like a local one
    rewrite_same_keys_and_size(local[1])
    batch = batch_of(urls)
    with pytest.raises(SidecarError, match=r"shard pipe:cat .*00001\.tar changed since"):
        ReferenceCache(urls, cache_dir=cache_dir).lookup(batch.keys, batch.urls, digests=batch.digests)
    assert toy_cache(urls, cache_dir=cache_dir)["changed"] == 1


def test_local_shards_may_use_a_cache_directory_too(tmp_path):
    urls = make_shards(tmp_path, 2, 2)
    cache_dir = tmp_path / "elsewhere"
    toy_cache(urls, cache_dir=cache_dir)
    assert not sidecar_path(urls[0], "reference").exists()
    relative = [os.path.relpath(u) for u in urls]  # the same shards, named otherwise
    assert len(ReferenceCache(relative, cache_dir=cache_dir)) == 4
    # a sidecar copied to another shard's name is not taken for it
    other = sidecar_path(urls[1], "reference", cache_dir)
    header = json.loads(sidecar_path(urls[0], "reference", cache_dir).read_text())
    other.write_text(json.dumps(header))
    with pytest.raises(SidecarError, match=r"holds the 'reference' embeddings of shard .*00000\.tar, not of"):
        ReferenceCache(urls, cache_dir=cache_dir)


def test_training_opens_the_cache_directory_of_its_config(tmp_path):
    from jestclip.train.config import TrainConfig
    from jestclip.train.startup import open_reference

    urls = [f"pipe:cat {u}" for u in make_shards(tmp_path, 1, 2)]
    toy_cache(urls, cache_dir=tmp_path / "cache")
    cfg = TrainConfig(data=urls[0], reference_cache_dir=str(tmp_path / "cache"))
    assert len(open_reference(cfg, urls)) == 2
    with pytest.raises(
        ValueError, match="is not a local file, so its 'reference' sidecars cannot sit beside"
    ):
        open_reference(TrainConfig(data=urls[0]), urls)


def test_jest_trains_on_shards_behind_a_url(tmp_path):
    """The README's example: cache-reference and JEST training on ``pipe:`` shards with a cache directory."""
    from jestclip.train.loop import train
    from jestclip.train.reference import cache_model_embeddings

    from ..train.test_loop import config

    local = make_shards(tmp_path / "pool", 2, 12)
    pattern = f"pipe:cat {tmp_path}/pool/{{00000..00001}}.tar"
    torch.manual_seed(1)
    summary = cache_model_embeddings(
        create_model("jest-micro"), "jest-micro", pattern, cache_dir=tmp_path / "c"
    )
    assert (summary["written"], summary["samples"]) == (2, 24)
    cfg = config(tmp_path / "run", local, "jest", steps=2, reference_cache_dir=str(tmp_path / "c"))
    train(dataclasses.replace(cfg, data=pattern))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]


def test_write_sidecar_reads_the_digests_from_the_shard_when_not_given(tmp_path):
    (url,) = make_shards(tmp_path, 1, 3)
    keys = sorted(shard_keys(url))
    write_sidecar(
        url, "reference", keys, unit_rows(3), unit_rows(3), toy_meta(shard_bytes=Path(url).stat().st_size)
    )
    batch = batch_of([url])
    cache = ReferenceCache([url], check_keys=True)
    assert cache.lookup(batch.keys, batch.urls, digests=batch.digests).image.shape == (3, 3)
    with pytest.raises(
        ValueError, match=r"shard .*00000\.tar lacks sample key 'zz': pass the content digests"
    ):
        write_sidecar(url, "reference", ["zz"], unit_rows(1), unit_rows(1), toy_meta())
