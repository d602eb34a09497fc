"""The step's speed switches (``train.speed``): each checked on the CPU where it applies, with the values it
must keep; the CUDA-only parts (pinned copies, inductor) are in ``tests/test_cuda.py``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from jestclip.models import create_model, forward_flops
from jestclip.train.config import ConfigError, TrainConfig, apply_overrides, with_defaults
from jestclip.train.loop import train
from jestclip.train.speed import (
    ScoringCopy,
    SpeedConfig,
    autocast,
    compile_problem,
    compile_towers,
    towers,
)
from jestclip.train.steps import SuperBatchTensors, score_embeddings

from .test_loop import config, same_run, shards  # noqa: F401  (a module fixture)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("jest-micro")


def batch(n: int = 6) -> SuperBatchTensors:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 400, (n, 16), generator=generator)
    return SuperBatchTensors(images, tokens)


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- the config ------------------------------------------------------------------------------------------


def test_defaults_are_what_runs_did_before_the_section():
    speed = SpeedConfig()
    assert speed.autocast_dtype(CUDA) is torch.bfloat16 and speed.autocast_dtype(CPU) is None
    assert not speed.bf16_scoring and speed.compile == "off"
    assert speed.pins(CUDA) and not speed.pins(CPU)  # page-locking needs CUDA
    assert SpeedConfig(precision="float32").autocast_dtype(CUDA) is None
    assert SpeedConfig(precision="bf16-autocast").autocast_dtype(CPU) is torch.bfloat16
    assert not SpeedConfig(pin_memory=False).pins(CUDA)
    saved = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "speed"}
    assert with_defaults(saved)["speed"] == dataclasses.asdict(SpeedConfig())  # an older run's config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("speed.precision=bf16", "speed.precision"),
        ("speed.compile=fast", "speed.compile"),
        ("speed.compile_backend=nope", "speed.compile_backend"),
        ("speed.bf16_scoring=1", "speed.bf16_scoring"),
        ("speed.pin_memory=yes", "speed.pin_memory"),
    ],
)
def test_bad_speed_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(TrainConfig(), [override])
    assert caught.value.key == key and str(caught.value).count("\n") == 0


def test_autocast_follows_precision():
    x = torch.randn(4, 4)
    with autocast(SpeedConfig(precision="bf16-autocast"), CPU):
        assert (x @ x).dtype is torch.bfloat16
    with autocast(SpeedConfig(), CPU):
        assert (x @ x).dtype is torch.float32


# --- the bf16 scoring copy ---------------------------------------------------------------------------------


def test_scoring_copy_is_the_learner_rounded_to_bf16_after_every_update():
    model = micro()
    copy = ScoringCopy(model, SpeedConfig(bf16_scoring=True))
    scorer = copy.scorer(model)
    theirs = dict(model.named_parameters())
    assert {n for n, _ in scorer.named_parameters()} == set(theirs)
    for name, p in scorer.named_parameters():
        assert p.dtype is torch.bfloat16 and not p.requires_grad
        assert torch.equal(p, theirs[name].detach().to(torch.bfloat16)), name
    with torch.no_grad():  # an optimiser update
        for p in model.parameters():
            p.add_(0.01)
    scorer = copy.scorer(model)
    for name, p in scorer.named_parameters():
        assert torch.equal(p, theirs[name].detach().to(torch.bfloat16)), name
    assert all(p.dtype is torch.float32 for p in model.parameters())  # the learner is untouched
    with pytest.raises(ValueError, match="float32 learner"):
        ScoringCopy(micro().to(torch.bfloat16), SpeedConfig())


@pytest.mark.parametrize("approx", [None, "flexi", "resolution", "patch_drop"])
def test_scoring_through_the_copy_agrees_with_float32(approx):
    model, data = micro(), batch()
    copy = ScoringCopy(model, SpeedConfig(bf16_scoring=True))
    exact = score_embeddings(model, data, approx, torch.Generator().manual_seed(3))
    rounded = score_embeddings(model, data, approx, torch.Generator().manual_seed(3), copy.scorer(model))
    assert rounded.image.dtype is torch.float32 and rounded.image.shape == exact.image.shape
    assert (rounded.scale, rounded.bias) == (exact.scale, exact.bias)  # the learner's
    cosine = lambda a, b: (a * b).sum(1)  # noqa: E731 (unit rows)
    assert cosine(rounded.image, exact.image).min() > 0.99 and cosine(rounded.text, exact.text).min() > 0.99
    assert not torch.equal(rounded.image, exact.image)  # it did run in bf16
    assert model.training  # score_embeddings leaves the learner's mode alone


def test_a_run_scoring_in_bf16_trains_and_resumes_bitwise(tmp_path, shards):  # noqa: F811
    speed = SpeedConfig(bf16_scoring=True)
    whole = config(tmp_path / "whole", shards, "flexi-jest", steps=4, speed=speed)
    train(whole, progress=False)
    for stop_after in (2, None):
        parts = config(tmp_path / "parts", shards, "flexi-jest", steps=4, speed=speed, stop_after=stop_after)
        train(parts, progress=False)
    assert same_run(whole.run_dir, str(tmp_path / "parts"))
    plain = config(tmp_path / "plain", shards, "flexi-jest", steps=4)
    train(plain, progress=False)
    losses = [[x["loss"] for x in metrics(run)] for run in (whole.run_dir, plain.run_dir)]
    assert losses[0] != losses[1]  # the scores were bf16's: the picks may differ, the run is its own
    assert losses[0] == pytest.approx(losses[1], rel=0.05)


def test_bf16_scoring_is_built_only_for_methods_that_select(tmp_path, shards):  # noqa: F811
    from jestclip.train.startup import build_state

    for method, expected in (("iid", False), ("jest", True)):
        cfg = config(tmp_path / method, shards, method, speed=SpeedConfig(bf16_scoring=True))
        assert (build_state(cfg, CPU).scoring_copy is not None) is expected


# --- compilation -------------------------------------------------------------------------------------------


def test_compiled_towers_keep_checkpoint_keys_and_values():
    model, data = micro(), batch()
    names = list(model.state_dict())
    eager = score_embeddings(model, data, None)
    assert list(towers(model)) == [model.visual.transformer, model.transformer]
    with pytest.raises(ValueError, match="no image tower"):
        list(towers(torch.nn.Linear(2, 2)))
    flops = forward_flops(model, image_size=32, context_length=16)
    compile_towers(model, "default", backend="aot_eager")  # traced, no code generated: the CPU test's
    assert forward_flops(model, image_size=32, context_length=16) == flops  # FLOPs are counted eagerly
    assert all(tower._compiled_call_impl is not None for tower in towers(model))
    assert list(model.state_dict()) == names
    compiled = score_embeddings(model, data, None)
    assert torch.allclose(compiled.image, eager.image, atol=1e-5)
    assert torch.allclose(compiled.text, eager.text, atol=1e-5)
    plain = micro()
    assert compile_towers(plain, "off") is plain
    assert all(tower._compiled_call_impl is None for tower in towers(plain))
    with pytest.raises(ValueError, match="compile mode"):
        compile_towers(micro(), "fast")


def test_a_compiled_run_matches_eager_and_resumes_uncompiled(tmp_path, shards):  # noqa: F811
    compiled = SpeedConfig(compile="default", compile_backend="aot_eager")
    eager = config(tmp_path / "eager", shards, "jest", steps=4)
    train(eager, progress=False)
    train(config(tmp_path / "mixed", shards, "jest", steps=4, speed=compiled, stop_after=2), progress=False)
    train(config(tmp_path / "mixed", shards, "jest", steps=4), progress=False)  # speed may change on resume
    a, b = metrics(eager.run_dir), metrics(str(tmp_path / "mixed"))
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-4)
    assert [x["examples_scored"] for x in b] == [x["examples_scored"] for x in a]


# --- precision ---------------------------------------------------------------------------------------------


def test_bf16_autocast_on_the_cpu_rounds_and_float32_is_the_cpu_default(tmp_path, shards):  # noqa: F811
    plain = config(tmp_path / "plain", shards, "iid", steps=2)
    same = config(tmp_path / "same", shards, "iid", steps=2, speed=SpeedConfig(precision="float32"))
    rounded = config(tmp_path / "bf16", shards, "iid", steps=2, speed=SpeedConfig(precision="bf16-autocast"))
    for cfg in (plain, same, rounded):
        train(cfg, progress=False)
    assert same_run(plain.run_dir, same.run_dir)  # "auto" on the CPU is float32
    a, b = metrics(plain.run_dir), metrics(rounded.run_dir)
    assert a[0]["loss"] != b[0]["loss"] and b[0]["loss"] == pytest.approx(a[0]["loss"], rel=0.02)


def test_a_compilation_that_cannot_run_here_is_refused_before_the_run(tmp_path, shards, monkeypatch):  # noqa: F811
    import shutil

    import torch.utils._triton

    inductor = SpeedConfig(compile="default")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler") as caught:
        train(config(tmp_path / "run", shards, "jest", speed=inductor), progress=False)
    assert caught.value.key == "speed.compile" and "speed.compile=off" in str(caught.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step
    assert compile_problem(SpeedConfig(compile="default", compile_backend="aot_eager"), CPU) is None
    assert compile_problem(SpeedConfig(), CPU) is None  # nothing compiled
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert "needs Triton on CUDA" in compile_problem(inductor, CUDA)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert compile_problem(inductor, CUDA) is None
