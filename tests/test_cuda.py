"""The library on a CUDA device: selection agrees with the CPU, the fused selection kernel computes what its
float64 emulation computes (each operand precision), a step of every method trains under bf16.

Each test's name holds ``cuda`` so that ``benchmarks/gpu.py`` (``pytest -k cuda``) runs them; without a CUDA
device they are skipped (CI has none).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jestclip.models import create_model
from jestclip.selection import (
    ConditionalScores,
    Embeddings,
    batch_score,
    conditional_scores,
    fused,
    joint_select,
)
from jestclip.train import MethodConfig, run_step
from jestclip.train.methods import get_method
from jestclip.train.steps import SuperBatchTensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not fused.triton_available(), reason="needs Triton")
CUDA = torch.device("cuda")


def embeddings(n: int, dim: int, seed: int) -> Embeddings:
    """L2-normalised CPU float32 embeddings whose pairs agree somewhat."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    text = F.normalize(image + torch.randn(n, dim, generator=g), dim=1)
    return Embeddings(image, text, 10.0, -10.0)


def to(emb: Embeddings, device: torch.device) -> Embeddings:
    return Embeddings(emb.image.to(device), emb.text.to(device), emb.scale, emb.bias)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_cuda_scores_match_the_cpu(loss: str) -> None:
    learner, reference = embeddings(1024, 64, 0), embeddings(1024, 64, 1)
    selected = torch.arange(0, 1024, 7)
    cpu = conditional_scores(learner, reference, selected, loss=loss)
    gpu = conditional_scores(to(learner, CUDA), to(reference, CUDA), selected.to(CUDA), loss=loss)
    finite = cpu.isfinite()
    assert torch.equal(finite, gpu.cpu().isfinite())
    torch.testing.assert_close(gpu.cpu()[finite], cpu[finite], rtol=1e-4, atol=1e-3)
    cpu_score = batch_score(learner, reference, selected, loss=loss)
    gpu_score = batch_score(to(learner, CUDA), to(reference, CUDA), selected.to(CUDA), loss=loss)
    torch.testing.assert_close(gpu_score.cpu(), cpu_score, rtol=1e-4, atol=1e-3)


def test_cuda_joint_select_is_distinct_in_range_and_seeded() -> None:
    learner, reference = to(embeddings(4096, 128, 2), CUDA), to(embeddings(4096, 128, 3), CUDA)

    def pick(seed: int) -> torch.Tensor:
        g = torch.Generator(CUDA).manual_seed(seed)
        return joint_select(learner, reference, size=819, n_chunks=16, generator=g)

    first = pick(0)
    assert first.device == learner.image.device and first.shape == (819,)
    assert first.unique().numel() == 819 and 0 <= int(first.min()) and int(first.max()) < 4096
    assert torch.equal(first, pick(0))
    assert not torch.equal(first, pick(1))


def test_cuda_joint_select_without_a_generator_matches_the_cpus_greedy_first_chunk() -> None:
    """The first chunk is drawn from scores with S empty; with a very large gain the draw is the top-k, so
    CUDA and CPU pick the same first chunk (the selection math, not the random stream, is compared)."""
    learner, reference = embeddings(2048, 64, 4), embeddings(2048, 64, 5)
    cpu = joint_select(learner, reference, size=128, n_chunks=8, gain=1e6)
    gpu = joint_select(to(learner, CUDA), to(reference, CUDA), size=128, n_chunks=8, gain=1e6)
    assert set(gpu[:16].cpu().tolist()) == set(cpu[:16].tolist())


def worst(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest magnitude."""
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


@needs_triton
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("precision", fused.PRECISIONS)
def test_cuda_fused_kernel_matches_its_float64_emulation(loss: str, precision: str) -> None:
    """The GPU's own path (bf16 matrix instructions, TF32 tensor cores, fast exp/log) equals the kernel's
    arithmetic done in float64 on the CPU up to float32 accumulation, autotuned and with fixed blocks."""
    emb = embeddings(3000, 768, 7)
    chunk = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:300]
    cpu = (emb.image, emb.text, emb.image[chunk], emb.text[chunk])
    kwargs = dict(scale=10.0, bias=-10.0, loss=loss, precision=precision)
    oracle = fused.emulated_chunk_terms(*cpu, **kwargs, dtype=torch.float64)
    for blocks in (None, (64, 32, 32)):
        row, col = fused.chunk_terms(*(t.to(CUDA) for t in cpu), **kwargs, blocks=blocks)
        assert row.device.type == "cuda" and row.dtype == torch.float32
        assert worst(row, oracle[0]) < 1e-5 and worst(col, oracle[1]) < 1e-5, (blocks, worst(row, oracle[0]))


@needs_triton
def test_cuda_fused_selection_keeps_the_float32_picks_and_is_deterministic() -> None:
    learner, reference = to(embeddings(8192, 256, 8), CUDA), to(embeddings(8192, 256, 9), CUDA)
    torch.backends.cuda.matmul.allow_tf32 = False

    def pick(backend: str) -> torch.Tensor:
        g = torch.Generator(CUDA).manual_seed(0)
        return joint_select(learner, reference, size=1638, n_chunks=16, generator=g, backend=backend)

    exact = set(pick("torch").tolist())
    for backend in ("triton-fp32", "triton-bf16x3"):
        assert len(exact & set(pick(backend).tolist())) >= 0.99 * 1638, backend
    first = pick("triton-bf16")
    assert first.unique().numel() == 1638 and torch.equal(first, pick("triton-bf16"))


@needs_triton
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_cuda_fused_chunk_update_stores_no_b_by_c_tile(loss: str) -> None:
    """At B = 40,960 a [B, c] float32 tile of a 512-pick chunk is 84 MB; absorbing such a chunk with the
    kernel (both models) and reading the scores stays within 16 MB of what was allocated before."""
    n = 40960
    learner, reference = to(embeddings(n, 768, 10), CUDA), to(embeddings(n, 768, 11), CUDA)
    state = ConditionalScores.from_embeddings(
        learner, reference, scoring="learnability", loss=loss, backend="triton-bf16"
    )
    chunk = torch.randperm(n, device=CUDA)[:512]
    state.absorb_indices(chunk[:256])  # compiles and autotunes
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    state.absorb_indices(chunk[256:])
    scores = state.conditional()
    torch.cuda.synchronize()
    assert scores.isfinite().all() and torch.cuda.max_memory_allocated() - base < 16 * 2**20


@pytest.mark.parametrize("method", ["iid", "jest", "flexi-jest", "drrho"])
def test_cuda_bf16_step_of_each_method_trains(method: str) -> None:
    torch.manual_seed(0)
    model = create_model("jest-micro", device=CUDA)
    cfg = MethodConfig(method, batch_size=16, n_chunks=4)
    n = get_method(method).super_batch(16, 0.8)
    g = torch.Generator(CUDA).manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(n, 3, size, size, device=CUDA, generator=g)
    tokens = torch.randint(1, 1000, (n, model.context_length), device=CUDA, generator=g)
    reference = to(embeddings(n, model.text_projection.shape[1], 6), CUDA)
    batch = SuperBatchTensors(images, tokens, reference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = run_step(model, batch, cfg, g)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(x).all() for x in grads)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_cuda_checkpoint_resumes_the_runs_generator(tmp_path) -> None:
    """A checkpoint loads onto the device (``map_location``): the CUDA generator's state must come back to the
    CPU to be set, and the resumed generator draws what the saved one would have."""
    from jestclip.train.config import TrainConfig
    from jestclip.train.rundir import RunDir
    from jestclip.train.startup import build_state

    cfg = TrainConfig(run_dir=str(tmp_path), model="jest-micro", device="cuda")
    state = build_state(cfg, CUDA)
    assert state.generator.device.type == "cuda"
    torch.rand(3, device=CUDA, generator=state.generator)
    run = RunDir(tmp_path)
    run.save_checkpoint(state.state_dict(cfg))
    expected = torch.rand(5, device=CUDA, generator=state.generator)
    resumed = build_state(cfg, CUDA)
    resumed.load_state_dict(run.load_latest(CUDA)[1])
    assert torch.equal(torch.rand(5, device=CUDA, generator=resumed.generator), expected)


# --- the step's speed switches (train.speed) on the device --------------------------------------------------


def test_cuda_to_device_copies_from_pinned_memory() -> None:
    from jestclip.data.loader import SuperBatch
    from jestclip.train.startup import to_device

    images = torch.rand(4, 3, 8, 8)
    batch = SuperBatch(keys=list("abcd"), urls=["u"] * 4, images=images, texts=list("wxyz"), meta=[{}] * 4)
    tokenize = lambda texts: torch.ones(len(texts), 5, dtype=torch.long)  # noqa: E731
    tensors = to_device(batch, tokenize, None, CUDA, pin_memory=True)
    torch.cuda.synchronize()
    assert tensors.images.is_cuda and torch.equal(tensors.images.cpu(), images)
    assert torch.equal(tensors.tokens.cpu(), torch.ones(4, 5, dtype=torch.long))
    assert batch.pin_memory().images.is_pinned()  # what the loader's pin thread calls


def speed_run(tmp_path, device: str, compile_mode: str, backend: str = "inductor") -> None:
    """A jest run on ``device`` with bf16 scoring, pinned copies and ``compile_mode``: it trains, and stopping
    at step 2 then resuming ends at a run of the same length and counts."""
    import dataclasses

    from jestclip.train.loop import train
    from jestclip.train.speed import SpeedConfig

    from .train.test_loop import cached_shards, config

    shards = cached_shards(tmp_path / "shards", 2, 12)
    speed = SpeedConfig(bf16_scoring=True, compile=compile_mode, compile_backend=backend)

    def run(name: str, **kw) -> dict:
        cfg = config(tmp_path / name, shards, "jest", steps=4, speed=speed, **kw)
        return train(dataclasses.replace(cfg, device=device), progress=False)

    last = run("whole")
    assert last["examples_learned"] == 16 and last["loss"] is not None
    run("parts", stop_after=2)
    resumed = run("parts")
    assert resumed["step"] == 4 and resumed["examples_scored"] == last["examples_scored"]


@pytest.mark.parametrize("compile_mode", ["off", "reduce-overhead"])  # "default": the benchmark's rows
def test_cuda_run_with_every_speed_switch_trains_and_resumes(tmp_path, compile_mode: str) -> None:
    speed_run(tmp_path, "cuda", compile_mode)


def test_cuda_bf16_scoring_copy_agrees_with_autocast_scoring() -> None:
    from jestclip.train.speed import ScoringCopy, SpeedConfig
    from jestclip.train.steps import score_embeddings

    torch.manual_seed(0)
    model = create_model("jest-micro", device=CUDA)
    g = torch.Generator(CUDA).manual_seed(0)
    images = torch.rand(64, 3, 32, 32, device=CUDA, generator=g)
    tokens = torch.randint(1, 1000, (64, model.context_length), device=CUDA, generator=g)
    batch = SuperBatchTensors(images, tokens)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = score_embeddings(model, batch, None)
        rounded = score_embeddings(model, batch, None, scorer=ScoringCopy(model, SpeedConfig()).scorer(model))
    assert (plain.image * rounded.image).sum(1).min() > 0.99
    assert (plain.text * rounded.text).sum(1).min() > 0.99
