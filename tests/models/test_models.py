"""Model factory, approximate encoders (with big_vision's PI-resize property) and FLOP accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed

from jestclip.models import (
    ForwardFlops,
    create_model,
    encode_image,
    forward_flops,
    logit_params,
    shipped_configs,
    step_flops,
)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("jest-micro").eval()


def test_shipped_configs_and_logit_init():
    assert {"jest-micro", "jest-tiny", "jest-small"} <= set(shipped_configs())
    scale, bias = (t.detach() for t in logit_params(create_model("jest-micro", loss="sigmoid")))
    assert float(scale) == pytest.approx(10.0) and float(bias) == pytest.approx(-10.0)
    scale, bias = (t.detach() for t in logit_params(create_model("jest-micro", loss="softmax")))
    assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5) and float(bias) == 0.0


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model config 'no-such-model'"):
        create_model("no-such-model")
    with pytest.raises(ValueError, match="loss must be one of"):
        create_model("jest-micro", loss="hinge")


def test_checkpoint_round_trip_and_mismatch(micro, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in micro.state_dict().items()}}, path)
    loaded = create_model("jest-micro", checkpoint=path).eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(images), micro.encode_image(images))
    with pytest.raises(ValueError, match="does not fit model 'jest-tiny'"):
        create_model("jest-tiny", checkpoint=path)


def test_exact_path_is_open_clips_encoder(micro):
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encode_image(micro, images), micro.encode_image(images))


def test_pi_resize_preserves_patch_embeddings(micro):
    """big_vision's FlexiViT property: <x, w> = <resize(x), PI-resize(w)> when patches are upsampled."""
    weight = micro.visual.conv1.weight.detach().double()  # [width, 3, p, p]
    p = weight.shape[-1]
    patches = torch.rand(16, 3, p, p, dtype=torch.float64)
    for new in (p + 1, 2 * p, 3 * p):
        resized = F.interpolate(patches, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
        kernel = resample_patch_embed(weight, [new, new])
        tokens = F.conv2d(patches, weight).flatten(1)
        tokens_resized = F.conv2d(resized, kernel).flatten(1)
        torch.testing.assert_close(tokens_resized, tokens, rtol=0, atol=1e-5)  # timm resizes in float32
    naive = F.interpolate(weight, size=(2 * p, 2 * p), mode="bicubic", align_corners=False) / 4
    resized = F.interpolate(patches, size=(2 * p, 2 * p), mode="bicubic", antialias=True, align_corners=False)
    assert (F.conv2d(resized, naive) - F.conv2d(patches, weight)).abs().max() > 1e-2  # plain resizing is not


@pytest.mark.parametrize("approx", ["flexi", "resolution", "patch_drop"])
def test_approximations_share_weights_and_train_them(approx):
    torch.manual_seed(0)
    model = create_model("jest-micro")
    images = torch.rand(3, 3, 32, 32)
    features = encode_image(model, images, approx, generator=torch.Generator().manual_seed(0), normalize=True)
    assert features.shape == (3, 64)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    features.sum().backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.visual.positional_embedding.grad.abs().sum() > 0


def test_patch_drop_is_seeded_and_validated(micro):
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = encode_image(micro, images, "patch_drop", generator=torch.Generator().manual_seed(1))
        b = encode_image(micro, images, "patch_drop", generator=torch.Generator().manual_seed(1))
        c = encode_image(micro, images, "patch_drop", generator=torch.Generator().manual_seed(2))
        full = encode_image(micro, images, "patch_drop", keep=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(full, micro.encode_image(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep must be in"):
        encode_image(micro, images, "patch_drop", keep=0.0)
    with pytest.raises(ValueError, match="approx must be one of"):
        encode_image(micro, images, "dropout")


def test_measured_flops(micro):
    full = forward_flops(micro, image_size=32, context_length=16)
    assert full.image > 0 and full.text > 0
    for approx in ("flexi", "patch_drop", "resolution"):
        cheap = forward_flops(micro, image_size=32, context_length=16, approx=approx)
        assert cheap.text == full.text
        assert 0.2 < cheap.image / full.image < 0.35  # ~1/4 of the tokens
    # the count is exactly the ViT's analytic FLOPs (2 per multiply-add): patch conv, per layer the qkv/out
    # projections, MLP and the two attention products, then the output projection
    w, p, layers, embed = 64, 4, 2, 64
    t = (32 // p) ** 2 + 1
    per_layer = 2 * t * (4 * w * w + 2 * w * 4 * w) + 2 * 2 * t * t * w
    assert full.image == 2 * (t - 1) * 3 * p * p * w + layers * per_layer + 2 * w * embed


def test_step_flops_match_appendix_a4():
    f = ForwardFlops(image=300, text=100)
    a = ForwardFlops(image=75, text=25)  # approximation factor A = 0.25
    b, B = 1000, 5000  # filter ratio 0.8
    iid = step_flops(batch=b, super_batch=b, learner=f).total
    jest = step_flops(batch=b, super_batch=B, learner=f, scorer=f, reuse_scoring_forward=True)
    assert jest.total / iid == pytest.approx(7 / 3)  # the paper's accounting
    recomputed = step_flops(batch=b, super_batch=B, learner=f, scorer=f)
    assert recomputed.total / iid == pytest.approx(8 / 3)  # jestclip's step recomputes the chosen forward
    flexi = step_flops(batch=b, super_batch=B, learner=f, scorer=a, approx_learner=a, approx_fraction=0.5)
    assert flexi.total / iid == pytest.approx(0.625 + 0.25 * 5 / 3)  # the paper's 1.04
    uncached = step_flops(batch=b, super_batch=B, learner=f, scorer=f, reference=f)
    assert uncached.reference == f.total * B
    with pytest.raises(ValueError, match="approximate learner"):
        step_flops(batch=b, super_batch=B, learner=f, approx_fraction=0.5)
    with pytest.raises(ValueError, match="only an exact learner scoring pass"):
        step_flops(batch=b, super_batch=B, learner=f, scorer=a, reuse_scoring_forward=True)
    with pytest.raises(ValueError, match="super_batch"):
        step_flops(batch=b, super_batch=b - 1, learner=f)
