"""Optimisation settings and the per-method step functions on the micro model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from jestclip.models import create_model
from jestclip.selection import Embeddings, steered_loss
from jestclip.train import (
    MethodConfig,
    OptimConfig,
    SuperBatchTensors,
    contrastive_loss,
    lr_factor,
    make_optimizer,
    make_scheduler,
    param_groups,
    run_step,
)


def synthetic_batch(n: int, seed: int = 0) -> SuperBatchTensors:
    """Images whose colour is fixed by a class, captions that name the class with a token: learnable pairs."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 8, (n,), generator=g)
    images = 0.1 * torch.rand(n, 3, 32, 32, generator=g)
    images[:, 0] += (classes.float() / 8.0)[:, None, None]
    tokens = torch.zeros(n, 16, dtype=torch.long)
    tokens[:, 0] = 49406  # start of text
    tokens[:, 1] = 1000 + classes
    tokens[:, 2] = 49407  # end of text
    reference = Embeddings(
        F.normalize(torch.randn(n, 8, generator=g), dim=1),
        F.normalize(torch.randn(n, 8, generator=g), dim=1),
        10.0,
        -10.0,
    )
    return SuperBatchTensors(images, tokens, reference)


def test_lr_schedule_warms_up_then_decays_to_zero():
    total = 1000
    assert lr_factor(0, total, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, total, 0.01) == pytest.approx(1.0)
    assert lr_factor(10, total, 0.01) == pytest.approx(1.0)
    assert lr_factor(505, total, 0.01) == pytest.approx(0.5, abs=1e-2)
    assert lr_factor(total - 1, total, 0.01) < 1e-4
    factors = [lr_factor(s, total, 0.01) for s in range(10, total)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_optimizer_follows_appendix_a1():
    model = create_model("jest-micro")
    opt = make_optimizer(model, OptimConfig())
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3
    decayed, exempt = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert {"logit_scale", "logit_bias", "positional_embedding", "visual.class_embedding"} <= exempt_names
    assert all(p.ndim >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 1e-4
    assert len(decayed["params"]) + len(exempt["params"]) == sum(1 for _ in model.parameters())
    sched = make_scheduler(opt, 100, OptimConfig())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # warm-up of 1 step at 100 steps
    for _ in range(50):
        opt.step()  # no gradients yet: a no-op that keeps the optimiser-then-scheduler order
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(50, 100, 0.01))
    assert opt.param_groups[0]["lr"] < 0.6e-3


def test_contrastive_losses_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    logits = scale * image @ text.T + bias
    signs = 2 * torch.eye(6) - 1
    expected = -F.logsigmoid(signs * logits).sum() / 6  # Algorithm 2's sigmoid_nll
    torch.testing.assert_close(contrastive_loss(image, text, scale, bias, "sigmoid"), expected)
    logits = scale * image @ text.T
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(contrastive_loss(image, text, scale, bias, "softmax"), expected)


@pytest.mark.parametrize(
    "cfg",
    [
        MethodConfig("jest", batch_size=8, n_chunks=4),
        MethodConfig("jest", batch_size=8, n_chunks=4, scoring="easy_reference"),
        MethodConfig("jest", batch_size=8, n_chunks=4, scoring="hard_learner", loss="softmax"),
        MethodConfig("independent", batch_size=8),
        MethodConfig(
            "independent", batch_size=8, independent_context="superbatch", independent_method="topk"
        ),
        MethodConfig("flexi-jest", batch_size=8, n_chunks=4),
        MethodConfig("flexi-jest", batch_size=8, n_chunks=4, approx="patch_drop", approx_fraction=0.25),
    ],
    ids=lambda c: f"{c.method}-{c.scoring}-{c.loss}-{c.approx}",
)
def test_selection_steps_select_b_and_backpropagate(cfg):
    torch.manual_seed(0)
    model = create_model("jest-micro", loss=cfg.loss)
    batch = synthetic_batch(32)
    out = run_step(model, batch, cfg, torch.Generator().manual_seed(0))
    assert out.selected.shape == (8,) and out.selected.unique().numel() == 8
    assert out.learned == 8
    assert out.scored == (0 if cfg.scoring == "easy_reference" else 32)
    assert math.isfinite(out.loss.item()) and out.selected_score is not None
    out.loss.backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0 and model.logit_scale.grad is not None


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_drrho_learns_on_the_batch_as_drawn_with_the_steered_loss(loss):
    """Every example, no scoring, and the loss is selection.steered_loss of the learner's features against
    the batch's reference embeddings; a batch without them is refused."""
    from jestclip.train.forward import LearningForward

    torch.manual_seed(0)
    model = create_model("jest-micro", loss=loss)
    batch, cfg = synthetic_batch(8), MethodConfig("drrho", batch_size=8, loss=loss)
    out = run_step(model, batch, cfg)
    assert torch.equal(out.selected, torch.arange(8))
    assert (out.learned, out.scored, out.selected_score) == (8, 0, None)
    image, text, scale, bias = LearningForward(model)(batch.images, batch.tokens)
    assert torch.equal(out.loss, steered_loss(image, text, scale, bias, batch.reference, loss))
    out.loss.backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0 and model.logit_scale.grad is not None
    with pytest.raises(ValueError, match="learns with the reference's embeddings: the batch has none"):
        run_step(model, SuperBatchTensors(batch.images, batch.tokens), cfg)


def test_steps_reject_wrong_batch_sizes():
    model = create_model("jest-micro")
    with pytest.raises(ValueError, match="iid learns on the whole batch"):
        run_step(model, synthetic_batch(16), MethodConfig("iid", batch_size=8))
    with pytest.raises(ValueError, match="smaller than batch_size"):
        run_step(model, synthetic_batch(4), MethodConfig("jest", batch_size=8))
    with pytest.raises(ValueError, match=r"method\.method = 'random' is not one of"):
        MethodConfig("random")


def test_steps_refuse_world_size_above_one_without_ddp():
    """Several ranks learning without a DDP module would never average their gradients."""
    model, batch = create_model("jest-micro"), synthetic_batch(4)
    with pytest.raises(ValueError, match="needs learn_module=data_parallel"):
        run_step(model, batch, MethodConfig("iid", batch_size=8), world_size=2)


@pytest.mark.parametrize("method", ["iid", "jest", "flexi-jest", "drrho"])
def test_a_few_steps_reduce_the_loss(method):
    """Training with each method lowers the contrastive loss of a fixed, learnable super-batch."""
    torch.manual_seed(0)
    model = create_model("jest-micro")
    cfg = MethodConfig(method, batch_size=32 if method in ("iid", "drrho") else 16, n_chunks=4, gain=1.0)
    opt = make_optimizer(model, OptimConfig(lr=3e-3, warmup_fraction=0.0))
    batch = synthetic_batch(32)
    g = torch.Generator().manual_seed(0)

    def full_loss() -> float:
        with torch.no_grad():
            return float(run_step(model, batch, MethodConfig("iid", batch_size=32)).loss)

    before = full_loss()
    for _ in range(25):
        opt.zero_grad()
        run_step(model, batch, cfg, g).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert full_loss() < 0.8 * before
