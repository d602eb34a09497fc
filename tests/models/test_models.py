"""Model factory, approximate encoders (with big_vision's PI-resize property) and FLOP accounting."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import resample_patch_embed
from torchvision.transforms import CenterCrop, Normalize, Resize

from jestclip.models import (
    ForwardFlops,
    create_model,
    encode_image,
    forward_flops,
    image_transform,
    logit_params,
    shipped_configs,
    step_flops,
    tokenizer,
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


OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (model, tag) -> the preprocessing its weights were trained with, spelled out from open_clip's pretrained.py
PRETRAINED_PREPROCESS = [
    ("ViT-B-16-SigLIP-256", "webli", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "squash", 256),
    ("ViT-B-32", "openai", OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest", 224),
    ("ViT-L-14-CLIPA-336", "datacomp1b", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "squash", 336),
    ("MobileCLIP-S1", "datacompdr", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", "shortest", 256),
]


@pytest.mark.parametrize(
    ("name", "tag", "mean", "std", "interpolation", "mode", "size"), PRETRAINED_PREPROCESS, ids=lambda v: v
)
def test_a_pretrained_tag_brings_its_own_preprocessing(name, tag, mean, std, interpolation, mode, size):
    assert (name, tag) in open_clip.list_pretrained()
    transform = image_transform(name, pretrained=tag)
    steps = transform.transforms
    assert isinstance(steps[-1], Normalize)
    assert tuple(steps[-1].mean) == pytest.approx(mean) and tuple(steps[-1].std) == pytest.approx(std)
    assert isinstance(steps[0], Resize) and steps[0].interpolation.value == interpolation
    if mode == "squash":  # both sides to size, no crop
        assert tuple(steps[0].size) == (size, size) and not any(isinstance(t, CenterCrop) for t in steps)
    else:  # shortest side to size, then a center crop
        assert steps[0].size == size and isinstance(steps[1], CenterCrop) and steps[1].size == (size, size)
    pixels = transform(Image.new("RGB", (300, 200), (51, 102, 204)))
    assert pixels.shape == (3, size, size)
    expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), expected.float(), atol=1e-3, rtol=0)


def test_the_pretrained_transform_is_open_clips_own(monkeypatch):
    """The same eval and train transforms as open_clip.create_model_and_transforms(name, pretrained=tag),
    whose weight download is stubbed out here (a randomly initialised model, its preprocessing unchanged)."""
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *args, **kwargs: None)
    _, train, val = open_clip.create_model_and_transforms("PE-Core-T-16-384", pretrained="meta")
    assert repr(image_transform("PE-Core-T-16-384", pretrained="meta")) == repr(val)
    assert repr(image_transform("PE-Core-T-16-384", pretrained="meta", train=True)) == repr(train)
    assert "Normalize(mean=(0.5, 0.5, 0.5)" in repr(val)


def test_without_a_tag_the_learners_transform_is_unchanged():
    for name in shipped_configs():
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
        for train in (False, True):
            expected = open_clip.image_transform(size, is_train=train)
            assert repr(image_transform(name, train=train)) == repr(expected)
    steps = image_transform("jest-micro").transforms
    assert steps[0].size == 32 and steps[1].size == (32, 32)
    assert tuple(steps[-1].mean) == OPENAI_MEAN and tuple(steps[-1].std) == OPENAI_STD


def test_a_pretrained_tokenizer_is_the_models_own():
    """open_clip's tags carry no tokenizer settings: the tag is checked, the model's tokenizer returned."""
    captions = ["a photo of a cat", "a dog"]
    tagged = tokenizer("ViT-B-32", pretrained="openai")
    assert torch.equal(tagged(captions), tokenizer("ViT-B-32")(captions))
    assert tagged(captions).shape == (2, 77)


def test_an_unknown_pretrained_tag_is_one_clear_error(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("open_clip.create_model called for an unknown tag")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    known = r"unknown pretrained tag 'nope' for model 'ViT-B-32'; open_clip has \[.*'openai'"
    with pytest.raises(ValueError, match=known):
        image_transform("ViT-B-32", pretrained="nope")
    with pytest.raises(ValueError, match=known):
        tokenizer("ViT-B-32", pretrained="nope")
    with pytest.raises(ValueError, match=known):
        create_model("ViT-B-32", pretrained="nope")
    with pytest.raises(ValueError, match="for model 'jest-micro'; open_clip has none"):
        image_transform("jest-micro", pretrained="webli")
    with pytest.raises(ValueError, match="unknown model config 'no-such-model'"):
        image_transform("no-such-model", pretrained="webli")


def test_a_quickgelu_tag_gets_quickgelu(monkeypatch, micro):
    """OpenAI's weights were trained with QuickGELU, which ViT-B-32's config lacks (open_clip only warns)."""
    calls = []

    def fake_create(name, **kwargs):
        calls.append((name, kwargs))
        return micro

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    create_model("ViT-B-32", pretrained="openai")
    create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    create_model("jest-micro")
    assert calls[0][1]["pretrained"] == "openai" and calls[0][1]["force_quick_gelu"] is True
    assert "force_quick_gelu" not in calls[1][1] and "force_quick_gelu" not in calls[2][1]
