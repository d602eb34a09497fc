"""The reference-embedding cache: memory-mapped sidecars per shard, joined by (shard, key), checked up front
from headers, with one-line errors naming the file when missing, stale, corrupt or truncated."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jestclip.data import SuperBatchStream, refcache
from jestclip.data.refcache import (
    CacheMeta,
    ReferenceCache,
    SidecarError,
    cache_reference,
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
    assert header["format"] == "jestclip-refcache/2" and header["finite"] is True and header["rows"] == 3
    assert sidecar_path(url, "reference").name == "00000.reference.json"


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
    assert shard_keys(url) == {"s0_000", "s0_001", "s0_002"}
    size = Path(url).stat().st_size
    write_sidecar(
        url, "reference", ["s0_000", "s0_001"], unit_rows(2), unit_rows(2), toy_meta(shard_bytes=size)
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
        write_sidecar(url, "reference", ["a", "b"], image, unit_rows(2), toy_meta())
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
    write_sidecar(
        urls[1], "reference", ["s1_000", "s1_001"], unit_rows(2, 4), unit_rows(2, 4), toy_meta(4, size)
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
        f"repairing {sidecar_path(urls[0], 'reference')} is corrupt" in err
        and f"repairing {emb} is truncated" in err
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
    assert loads == ["00002.reference.keys.npy", "00002.reference.emb.npy"]
    reference.lookup(["s0_001"], [urls[0]])
    assert list(reference._open) == [0]  # at most max_open shards stay mapped


def test_lookup_joins_by_shard_and_key(tmp_path):
    urls = make_shards(tmp_path, 2, 2)
    sizes = [Path(u).stat().st_size for u in urls]
    image = unit_rows(6, 4, seed=1)
    # the same key in both shards with different rows; shard 1's keys are written unsorted
    write_sidecar(urls[0], "reference", ["same", "a"], image[:2], image[:2], toy_meta(4, sizes[0]))
    write_sidecar(urls[1], "reference", ["zz", "same", "b", "c"], image[2:], image[2:], toy_meta(4, sizes[1]))
    reference = ReferenceCache(urls)
    keys, shards = ["same", "c", "same", "zz", "a"], [urls[1], urls[1], urls[0], urls[1], urls[0]]
    emb = reference.lookup(keys, shards)
    expected = torch.from_numpy(image[[3, 5, 0, 2, 1]]).float()
    torch.testing.assert_close(emb.image, expected, atol=0, rtol=0)
    torch.testing.assert_close(emb.text, expected, atol=0, rtol=0)
    assert emb.image.dtype == torch.float32 and (emb.scale, emb.bias) == (5.0, -1.0)
    assert reference.lookup([], []).image.shape == (0, 4)
    with pytest.raises(ValueError, match="lookup got 2 keys but 1 shard urls"):
        reference.lookup(["a", "b"], urls[:1])


def test_the_training_loop_passes_shard_urls(monkeypatch):
    from jestclip.train import setup

    seen = []

    class Recorder:
        def lookup(self, keys, urls=None, *, device="cpu"):
            seen.append((keys, urls))

    batch = SimpleNamespace(keys=["k"], urls=["u.tar"], images=torch.zeros(1, 3, 2, 2), texts=["t"])
    setup.to_device(batch, lambda texts: torch.zeros(1, 2, dtype=torch.long), Recorder(), torch.device("cpu"))
    assert seen == [(["k"], ["u.tar"])]


def test_memory_maps_read_only_the_pages_asked_for(tmp_path, monkeypatch):
    # without MADV_RANDOM a page fault reads the whole read-ahead window (MiBs) around it: a cache larger
    # than RAM read 27 GB per random lookup; a dense run of rows is asked for ahead, in bulk (MADV_WILLNEED)
    (url,) = make_shards(tmp_path, 1, 2)
    size = Path(url).stat().st_size
    keys = [f"k{i:03d}" for i in range(100)]
    write_sidecar(url, "reference", keys, unit_rows(100), unit_rows(100), toy_meta(shard_bytes=size))
    advised = []
    real = refcache._advise
    monkeypatch.setattr(
        refcache,
        "_advise",
        lambda emb, advice, rows=None: advised.append((advice, rows)) or real(emb, advice, rows),
    )
    reference = ReferenceCache([url])
    reference.lookup(keys[:3], [url] * 3)
    assert advised == [(mmap.MADV_RANDOM, None)]
    reference.lookup(keys[10:90], [url] * 80)
    assert advised[1:] == [(mmap.MADV_WILLNEED, (10, 90))]


def test_a_sidecar_of_the_same_weights_under_another_preprocessing_is_rewritten(tmp_path):
    """`cache-reference --pretrained TAG` records the model as NAME@TAG: the same weights cached with other
    preprocessing (another tag, or none) are stale, not kept."""
    urls = make_shards(tmp_path, 1, 4)
    first = toy_cache(urls)
    again = toy_cache(urls)
    other = toy_cache(urls, model_name="toy@tag")
    assert (first["written"], again["kept"], other["written"]) == (1, 1, 1)
