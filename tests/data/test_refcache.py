"""The reference-embedding cache: sidecars per shard, joined by key, with clear errors when stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jestclip.data import SuperBatchStream
from jestclip.data.refcache import ReferenceCache, cache_reference, sidecar_path
from jestclip.models import (
    create_model,
    image_transform,
    model_fingerprint,
    reference_embedder,
    reference_logits,
    tokenizer,
)

from .test_loader import make_shards

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
    emb = ReferenceCache(urls, fingerprint=model_fingerprint(model), dim=64).lookup(keys)
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
    with pytest.raises(ValueError, match="sample key 'nope' has no cached 'reference' embedding"):
        ReferenceCache(urls).lookup(["s0_000", "nope"])
    cache(create_model("jest-micro"), urls[1:])
    with pytest.raises(ValueError, match="differ from those of"):
        ReferenceCache(urls)
    with open(urls[0], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="changed since its 'reference' embeddings were cached"):
        ReferenceCache(urls[:1])


def test_sidecar_loads_without_pickle(setup):
    model, urls = setup
    cache(model, urls[:1])
    with np.load(sidecar_path(urls[0], "reference"), allow_pickle=False) as data:
        assert data["image"].dtype == np.float16 and data["keys"].tolist()[0] == "s0_000"


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
