"""The DRRho-style steered loss against a written-out float64 oracle: values, gradients, the identities that
pin whose scale and bias enter, and shares of a batch (what each data-parallel rank computes)."""

from __future__ import annotations

import math

import pytest
import torch

from jestclip.selection import Embeddings, steered_loss

from .helpers import learner_and_reference

LOSSES = ("sigmoid", "softmax")
B = 5


def dense_steered(x, y, s, beta, xr, yr, loss):
    """The loss and its gradient in (x, y, s, beta), written out pair by pair in float64.

    D_ij = s (x_i.y_j - x'_i.y'_j) (+ beta); softmax: (1/2b) sum_i [-D_ii + log sum_j e^D_ij] + [-D_ii +
    log sum_j e^D_ji]; sigmoid: (1/b) sum_ij log(1 + e^(-z_ij D_ij)). G_ij = d loss / d D_ij, then
    dx_i = s sum_j G_ij y_j, dy_j = s sum_i G_ij x_i, ds = sum_ij G_ij (x_i.y_j - x'_i.y'_j), dbeta = sum G.
    """
    b = len(x)
    cos = [[float(x[i] @ y[j]) - float(xr[i] @ yr[j]) for j in range(b)] for i in range(b)]
    shift = beta if loss == "sigmoid" else 0.0
    d = [[s * cos[i][j] + shift for j in range(b)] for i in range(b)]
    g = [[0.0] * b for _ in range(b)]
    value = 0.0
    if loss == "softmax":
        for i in range(b):
            row = sum(math.exp(d[i][j]) for j in range(b))
            col = sum(math.exp(d[j][i]) for j in range(b))
            value += (-d[i][i] + math.log(row) - d[i][i] + math.log(col)) / (2 * b)
            for j in range(b):
                g[i][j] += (math.exp(d[i][j]) / row - (i == j)) / (2 * b)  # image i's row
                g[j][i] += (math.exp(d[j][i]) / col - (i == j)) / (2 * b)  # text i's column
    else:
        for i in range(b):
            for j in range(b):
                z = 1.0 if i == j else -1.0
                value += math.log1p(math.exp(-z * d[i][j])) / b
                g[i][j] = -z / (1.0 + math.exp(z * d[i][j])) / b
    gt = torch.tensor(g, dtype=torch.float64)
    grads = {
        "image": s * gt @ y,
        "text": s * gt.T @ x,
        "scale": sum(g[i][j] * cos[i][j] for i in range(b) for j in range(b)),
        "bias": sum(map(sum, g)),  # sigmoid only
    }
    return value, grads


def leaves(seed: int = 0, n: int = B):
    """Learner features, scale and bias as float64 leaves with gradients; a reference of another width."""
    learner, reference = learner_and_reference(n, seed=seed)
    image, text = learner.image.clone().requires_grad_(), learner.text.clone().requires_grad_()
    scale = torch.tensor(learner.scale, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(learner.bias, dtype=torch.float64, requires_grad=True)
    return image, text, scale, bias, reference


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_the_written_out_formula(loss, seed):
    image, text, scale, bias, reference = leaves(seed)
    assert reference.dim != image.shape[1]  # the reference's width is its own
    value = steered_loss(image, text, scale, bias, reference, loss)
    value.backward()
    want, grads = dense_steered(
        image.detach(), text.detach(), scale.item(), bias.item(), reference.image, reference.text, loss
    )
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(image.grad, grads["image"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(text.grad, grads["text"], rtol=1e-10, atol=1e-12)
    assert scale.grad.item() == pytest.approx(grads["scale"], rel=1e-10, abs=1e-12)
    if loss == "softmax":  # the bias is not used (as by open_clip's ClipLoss)
        assert bias.grad is None
    else:
        assert bias.grad.item() == pytest.approx(grads["bias"], rel=1e-10, abs=1e-12)


def test_the_reference_enters_with_the_learners_scale_and_bias():
    """Its own scale and bias are not used: changing them changes nothing (the oracle above multiplies the
    reference's cosines by the learner's scale, 10, where the reference's own is 14)."""
    image, text, scale, bias, reference = leaves()
    other = Embeddings(reference.image, reference.text, scale=99.0, bias=3.0)
    for loss in LOSSES:
        a = steered_loss(image, text, scale, bias, reference, loss)
        assert torch.equal(a, steered_loss(image, text, scale, bias, other, loss))
    assert (scale.item(), reference.scale) == (10.0, 14.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_a_reference_equal_to_the_learner_cancels_the_steering(loss):
    """D_ij = 0 (softmax: every row's cross-entropy is log b) or beta (sigmoid: one positive and b - 1
    negatives at logit beta, per image)."""
    image, text, scale, bias, _ = leaves()
    same = Embeddings(image.detach(), text.detach(), scale=1.0)
    value = steered_loss(image, text, scale, bias, same, loss).item()
    beta = bias.item()
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want = math.log(B) if loss == "softmax" else softplus(-beta) + (B - 1) * softplus(beta)
    assert value == pytest.approx(want, rel=1e-13)
    assert math.log(B) == pytest.approx(1.6094379124341003)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_reference_gets_no_gradient(loss):
    image, text, scale, bias, reference = leaves()
    ref_image, ref_text = reference.image.clone().requires_grad_(), reference.text.clone().requires_grad_()
    frozen = Embeddings(ref_image, ref_text, reference.scale, reference.bias)
    steered_loss(image, text, scale, bias, frozen, loss).backward()
    assert ref_image.grad is None and ref_text.grad is None
    assert image.grad is not None and scale.grad is not None


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(loss):
    image, text, scale, bias, reference = leaves(n=3)
    inputs = (image, text, scale, bias)
    assert torch.autograd.gradcheck(lambda *a: steered_loss(*a, reference, loss), inputs)


@pytest.mark.parametrize("loss", LOSSES)
def test_shares_of_a_batch_average_to_the_batch_loss_and_gradient(loss):
    """What each of W data-parallel ranks computes (its rows against the whole batch): the mean over the
    ranks is the batch loss, and so is its gradient (the whole batch's features carrying gradients, as
    after an all-gather with gradients)."""
    image, text, scale, bias, reference = leaves(n=6)
    params = (image, text, scale, bias) if loss == "sigmoid" else (image, text, scale)
    whole = steered_loss(image, text, scale, bias, reference, loss)
    want = torch.autograd.grad(whole, params)
    for world in (2, 3):
        n = 6 // world
        shares = [
            steered_loss(
                image[r * n : (r + 1) * n],
                text[r * n : (r + 1) * n],
                scale,
                bias,
                reference.take(torch.arange(r * n, (r + 1) * n)),
                loss,
                batch=(image, text, reference),
                offset=r * n,
            )
            for r in range(world)
        ]
        mean = torch.stack(shares).mean()
        assert mean.item() == pytest.approx(whole.item(), rel=1e-12)
        for got, expected in zip(torch.autograd.grad(mean, params), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_bad_input_is_one_clear_error():
    image, text, scale, bias, reference = leaves()
    with pytest.raises(ValueError, match=r"loss must be one of \('sigmoid', 'softmax'\), got 'hinge'"):
        steered_loss(image, text, scale, bias, reference, "hinge")
    with pytest.raises(ValueError, match=r"steered_loss: reference has shape \(4,\), expected \(5,\)"):
        steered_loss(image, text, scale, bias, reference.take(torch.arange(4)), "sigmoid")
    with pytest.raises(ValueError, match=r"steered_loss: text has shape \(4, 8\), expected \(5, 8\)"):
        steered_loss(image, text[:4], scale, bias, reference, "sigmoid")
    with pytest.raises(ValueError, match=r"rows \[3, 8\) are not rows of a batch of 5"):
        steered_loss(image, text, scale, bias, reference, "softmax", batch=(image, text, reference), offset=3)


@pytest.mark.parametrize("loss", LOSSES)
def test_without_a_reference_signal_it_is_open_clips_loss(loss):
    """A reference whose cosines are all 0 steers nothing: the loss is open_clip's SigLipLoss / ClipLoss of
    the learner (what iid learns with), so drrho differs from iid by the reference alone."""
    from jestclip.train.steps import contrastive_loss

    image, text, scale, bias, reference = leaves()
    silent = Embeddings(torch.zeros_like(reference.image), torch.zeros_like(reference.text), 1.0)
    got = steered_loss(image, text, scale, bias, silent, loss)
    assert got.item() == pytest.approx(contrastive_loss(image, text, scale, bias, loss).item(), rel=1e-12)
