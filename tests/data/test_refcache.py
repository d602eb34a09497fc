"""The reference-embedding cache: sidecars per shard, joined by key, with clear errors when stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jestclip.data import SuperBatchStream
from jestclip.data.refcache import ReferenceCache, cache_reference, sidecar_path
from jestclip.models import create_model, image_transform, model_fingerprint, tokenizer

from .test_loader import make_shards


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = create_model("jest-micro")
    urls = make_shards(tmp_path, 2, 5)
    kwargs = dict(
        model_name="jest-micro",
        fingerprint=model_fingerprint(model),
        tokenize=tokenizer("jest-micro"),
        transform=image_transform("jest-micro"),
        batch_size=4,
    )
    return model, urls, kwargs


def test_cache_then_lookup_by_key(setup):
    model, urls, kwargs = setup
    summary = cache_reference(model, urls, **kwargs)
    assert summary["written"] == 2 and summary["samples"] == 10
    assert all(sidecar_path(u, "reference").exists() for u in urls)
    cache = ReferenceCache(urls, fingerprint=kwargs["fingerprint"], dim=64)
    keys = ["s1_004", "s0_000", "s1_002"]
    emb = cache.lookup(keys)
    assert (
        emb.image.shape == (3, 64) and emb.scale == pytest.approx(10.0) and emb.bias == pytest.approx(-10.0)
    )
    # the same as embedding those samples directly (up to float16 storage)
    transform = kwargs["transform"]
    samples = {
        s.key: s
        for s in SuperBatchStream(urls, batch_size=1, shuffle_shards=False, transform=transform).samples()
    }
    with torch.no_grad():
        direct = F.normalize(model.eval().encode_image(torch.stack([samples[k].image for k in keys])), dim=-1)
        text = F.normalize(model.encode_text(kwargs["tokenize"]([samples[k].text for k in keys])), dim=-1)
    torch.testing.assert_close(emb.image, direct, atol=2e-3, rtol=0)
    torch.testing.assert_close(emb.text, text, atol=2e-3, rtol=0)


def test_cache_resumes_and_recomputes_for_another_model(setup):
    model, urls, kwargs = setup
    cache_reference(model, urls, **kwargs)
    assert cache_reference(model, urls, **kwargs)["kept"] == 2
    other = create_model("jest-micro")
    summary = cache_reference(other, urls, **{**kwargs, "fingerprint": model_fingerprint(other)})
    assert summary["written"] == 2


def test_stale_or_missing_caches_are_clear_errors(setup, tmp_path):
    model, urls, kwargs = setup
    with pytest.raises(ValueError, match=r"no cached 'reference' embeddings for shard .*00000\.tar"):
        ReferenceCache(urls)
    cache_reference(model, urls, **kwargs)
    with pytest.raises(ValueError, match="not the expected deadbeef"):
        ReferenceCache(urls, fingerprint="deadbeef")
    with pytest.raises(ValueError, match="have dim 64, expected 128"):
        ReferenceCache(urls, dim=128)
    with pytest.raises(ValueError, match="sample key 'nope' has no cached 'reference' embedding"):
        ReferenceCache(urls).lookup(["s0_000", "nope"])
    other = create_model("jest-micro")
    cache_reference(other, urls[1:], **{**kwargs, "fingerprint": model_fingerprint(other)})
    with pytest.raises(ValueError, match="differ from those of"):
        ReferenceCache(urls)
    with open(urls[0], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="changed since its 'reference' embeddings were cached"):
        ReferenceCache(urls[:1])


def test_sidecar_loads_without_pickle(setup):
    model, urls, kwargs = setup
    cache_reference(model, urls[:1], **kwargs)
    with np.load(sidecar_path(urls[0], "reference"), allow_pickle=False) as data:
        assert data["image"].dtype == np.float16 and data["keys"].tolist()[0] == "s0_000"
