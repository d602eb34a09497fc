"""Selection numerics are defined: fp32 scores and sampling whatever autocast region the caller is in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jestclip.selection import Embeddings, conditional_scores, independent_select, joint_select


def trained_like(n: int, d: int, *, noise: float, scale: float, bias: float, seed: int) -> Embeddings:
    """Positive pairs far closer than negatives, as after training: logits ~scale on the diagonal."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=g), dim=-1)
    return Embeddings(image, text, torch.tensor(scale), torch.tensor(bias))


def selections() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    learner = trained_like(4096, 128, noise=0.6, scale=14.0, bias=-9.0, seed=0)
    reference = trained_like(4096, 128, noise=0.3, scale=18.0, bias=-11.0, seed=1)
    joint = joint_select(
        learner, reference, size=819, n_chunks=16, generator=torch.Generator().manual_seed(3)
    )
    independent = independent_select(learner, reference, size=819, generator=torch.Generator().manual_seed(3))
    scores = conditional_scores(learner, reference, joint[:100])
    return joint, independent, scores


def test_bf16_autocast_does_not_change_the_selection():
    fp32 = selections()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = selections()
        assert torch.is_autocast_enabled("cpu")  # the caller's region is left as it was
    for a, b in zip(fp32, under_autocast, strict=True):
        assert torch.equal(a, b)


def test_without_the_guard_bf16_would_change_the_scores():
    """The regression the guard prevents: the same tile math under autocast moves scores visibly."""
    learner = trained_like(512, 128, noise=0.6, scale=14.0, bias=-9.0, seed=0)
    logits_fp32 = learner.image @ learner.text.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_bf16 = learner.image @ learner.text.T
    assert logits_bf16.dtype == torch.bfloat16
    assert float((logits_bf16.float() - logits_fp32).abs().max()) * 14.0 * 100 > 0.1  # after scale and gain
