"""Tiny end-to-end runs: every method trains, counts and resumes exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from jestclip.models import (
    create_model,
    forward_flops,
    image_transform,
)
from jestclip.train.config import MethodConfig, TrainConfig, apply_overrides, load_recipe, to_dict
from jestclip.train.loop import train
from jestclip.train.reference import cache_model_embeddings
from jestclip.train.rundir import RunDir

from ..data.test_loader import make_shards

RECIPES = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.py"))


def cached_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """Generated shards with a micro reference model's embeddings cached next to them."""
    urls = make_shards(root, n_shards, per_shard)
    torch.manual_seed(1)
    cache_model_embeddings(create_model("jest-micro"), "jest-micro", urls)
    return urls


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return cached_shards(tmp_path_factory.mktemp("shards"), 2, 12)


def config(run_dir: Path, shards: list[str], method: str, **kw) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir),
        model="jest-micro",
        data=str(Path(shards[0]).parent),
        method=MethodConfig(method, batch_size=4, n_chunks=2, gain=1.0),
        filter_ratio=0.5,
        steps=kw.pop("steps", 3),
        log_every=1,
        checkpoint_every=kw.pop("checkpoint_every", 100),
        num_workers=0,
        device="cpu",
        **kw,
    )


@pytest.mark.parametrize("method", ["iid", "jest", "independent", "flexi-jest", "drrho"])
def test_every_method_trains_and_counts(tmp_path, shards, method):
    cfg = config(tmp_path / method, shards, method)
    last = train(cfg, progress=False)
    run = Path(cfg.run_dir)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert last["examples_learned"] == 12
    selects = method not in ("iid", "drrho")
    assert last["examples_scored"] == (24 if selects else 0)  # B = 8 per step
    per_step = lines[0]["flops_total"]
    assert per_step > 0 and last["flops_total"] == pytest.approx(3 * per_step)
    model = create_model("jest-micro")
    f = forward_flops(model, image_size=32, context_length=16)
    fa = forward_flops(model, image_size=32, context_length=16, approx="flexi")
    b, big_b = 4, 8
    expected = {  # appendix A.4, with the chosen examples' forward recomputed (jestclip's steps)
        "iid": 3 * f.total * b,
        "drrho": 3 * f.total * b,  # the reference's embeddings are cached
        "jest": 3 * f.total * b + f.total * big_b,
        "independent": 3 * f.total * b + f.total * big_b,
        "flexi-jest": 3 * (0.5 * fa.total + 0.5 * f.total) * b + fa.total * big_b,
    }[method]
    assert per_step == pytest.approx(expected)
    assert last["flops_reference"] == 0.0  # cached
    if selects:
        assert lines[0]["flops_score"] > 0 and lines[0]["selected_score"] is not None
    assert json.loads((run / "config.json").read_text())["method"]["method"] == method
    assert (run / "model.pt").exists() and list((run / "tb").iterdir())


def test_interrupted_run_resumes_bitwise(tmp_path, shards):
    whole = config(tmp_path / "whole", shards, "jest", steps=5)
    train(whole, progress=False)
    parts = config(tmp_path / "parts", shards, "jest", steps=5, stop_after=2)
    train(parts, progress=False)
    assert not (Path(parts.run_dir) / "model.pt").exists()  # stopped early: checkpoint only
    train(config(tmp_path / "parts", shards, "jest", steps=5), progress=False)
    a = torch.load(Path(whole.run_dir) / "model.pt", weights_only=True)
    b = torch.load(Path(parts.run_dir) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def metrics(run_dir):
        lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k != "wall_s"} for x in lines]

    assert metrics(whole.run_dir) == metrics(parts.run_dir)


def test_periodic_eval_is_logged_and_leaves_training_unchanged(tmp_path, shards):
    from ..eval.test_evaluate import make_suite

    make_suite(tmp_path / "bench" / "eval", "toy", per_class=3)
    plain = config(tmp_path / "plain", shards, "jest", steps=5)
    train(plain, progress=False)
    evald = config(
        tmp_path / "evald", shards, "jest", steps=5, stop_after=2, eval_data=str(tmp_path / "bench")
    )
    evald = dataclasses.replace(evald, eval_every=2)
    train(evald, progress=False)
    train(dataclasses.replace(evald, stop_after=None), progress=False)  # resumed after the step-2 eval
    lines = [json.loads(x) for x in (Path(evald.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/average" in x]
    assert [x["step"] for x in evals] == [0, 2, 4, 5]
    assert {"eval/toy/zeroshot:colour", "eval/toy/retrieval:t2i_r@5", "examples_learned"} <= set(evals[1])
    assert evals[0]["examples_learned"] == 0 and evals[-1]["examples_learned"] == 20
    a = torch.load(Path(plain.run_dir) / "model.pt", weights_only=True)
    b = torch.load(Path(evald.run_dir) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating changed nothing of the run


def test_resume_refuses_a_different_config(tmp_path, shards):
    train(config(tmp_path / "run", shards, "iid", stop_after=1), progress=False)
    with pytest.raises(ValueError, match=r"different config \(\['seed'\]\)"):
        train(config(tmp_path / "run", shards, "iid", seed=5), progress=False)


def test_a_run_saved_before_a_config_key_existed_resumes_at_its_default(tmp_path, shards):
    train(config(tmp_path / "run", shards, "iid", stop_after=1), progress=False)
    run = RunDir(tmp_path / "run")
    saved = run.read_config()
    del saved["draft_decode"], saved["method"]["approx"]  # as written by an older jestclip
    run.write_config(saved)
    train(config(tmp_path / "run", shards, "iid", stop_after=2), progress=False)
    saved["method"]["gain"] = 2.0  # a value that was set still has to match
    run.write_config(saved)
    with pytest.raises(ValueError, match=r"different config \(\['method'\]\)"):
        train(config(tmp_path / "run", shards, "iid"), progress=False)


def test_the_stream_decodes_jpegs_for_the_learner_input_size_unless_told_not_to(shards):
    from jestclip.train.startup import Placement, open_stream

    where = Placement(torch.device("cpu"))
    for draft, expected in ((True, 32), (False, None)):
        cfg = TrainConfig(model="jest-micro", data=shards[0], draft_decode=draft)
        assert open_stream(cfg, shards, image_transform("jest-micro"), where).decode_size == expected


def test_missing_reference_cache_fails_before_training(tmp_path, shards):
    cfg = config(tmp_path / "run", shards, "jest", reference_cache="other")
    # the message names the caches that do exist (the demo names its cache demo-reference, the recipes
    # reference: a user who ran the demo got "no cached 'reference' embeddings" and nothing more)
    with pytest.raises(
        ValueError, match=r"no cached 'other' embeddings for shard .*caches found for it: 'ref"
    ):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_overrides_and_recipes():
    cfg = apply_overrides(
        TrainConfig(), ["steps=7", "method.batch_size=32", "optim.lr=3e-4", "data=some/dir"]
    )
    assert (cfg.steps, cfg.method.batch_size, cfg.optim.lr, cfg.data) == (7, 32, 3e-4, "some/dir")
    assert cfg.super_batch == 160
    with pytest.raises(ValueError, match=r"unknown config key 'method\.batch'"):
        apply_overrides(TrainConfig(), ["method.batch=3"])
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides(TrainConfig(), ["steps"])
    assert len(RECIPES) >= 6
    for recipe in RECIPES:
        for quick in (True, False):
            assert isinstance(load_recipe(recipe, quick=quick), TrainConfig)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, shards):
    import signal
    import subprocess
    import sys
    import time

    cfg = config(tmp_path / "run", shards, "iid", steps=400)
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "from jestclip.train.config import from_dict\n"
        f"def get_config(quick=False):\n    return from_dict({to_dict(cfg)!r})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "jestclip.cli", "train", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stdout.read().decode()[-2000:]  # 128 + SIGTERM: preempted
    checkpoint = RunDir(cfg.run_dir).latest_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    stopped_at = state["counters"]["step"]
    assert 2 <= stopped_at < 400 and checkpoint.name == f"checkpoint-{stopped_at:06d}.pt"
    assert f"preempted at step {stopped_at}; checkpoint {checkpoint}" in proc.stdout.read().decode()
    assert not (Path(cfg.run_dir) / "model.pt").exists()
    resumed = train(
        config(tmp_path / "run", shards, "iid", steps=400, stop_after=stopped_at + 2), progress=False
    )
    assert resumed["step"] == stopped_at + 2


# --- resume at the recorded data position: bitwise, reading only what was not consumed ----------------------


def same_run(a: str, b: str) -> bool:
    """Whether two run directories hold bitwise the same final weights and metrics (wall times aside)."""

    def metrics(run_dir: str) -> list[dict]:
        lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k != "wall_s"} for x in lines]

    x = torch.load(Path(a) / "model.pt", weights_only=True)
    y = torch.load(Path(b) / "model.pt", weights_only=True)
    return all(torch.equal(x[k], y[k]) for k in x) and metrics(a) == metrics(b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    """The run directory of an uninterrupted 5-step JEST run, per ``num_workers`` (trained once)."""
    runs: dict[int, str] = {}

    def get(num_workers: int) -> str:
        if num_workers not in runs:
            cfg = config(tmp_path_factory.mktemp("whole"), shards, "jest", steps=5)
            train(dataclasses.replace(cfg, num_workers=num_workers), progress=False)
            runs[num_workers] = cfg.run_dir
        return runs[num_workers]

    return get


def test_resume_mid_shard_decodes_only_what_comes_next(tmp_path, shards, uninterrupted, monkeypatch):
    from jestclip.data import loader

    cfg = config(tmp_path / "run", shards, "jest", steps=5, stop_after=2)
    train(cfg, progress=False)
    state = torch.load(RunDir(cfg.run_dir).latest_checkpoint(), weights_only=True)
    (position,) = state["data"]  # one rank
    assert position["next"] == 0
    assert position["workers"][0]["sample"] == 4  # 16 samples read: a 12-sample shard and 4 of the next
    decoded = []
    real = loader.decode_sample
    monkeypatch.setattr(
        "jestclip.data.stream.decode_sample",
        lambda raw, **kw: decoded.append(raw["__key__"]) or real(raw, **kw),
    )
    train(dataclasses.replace(cfg, stop_after=None), progress=False)
    assert len(decoded) == 3 * 8 + 1  # steps 3-5 (B = 8) and the sample after them; a replay decodes 16 more
    assert same_run(uninterrupted(0), cfg.run_dir)


def test_resume_with_two_loader_workers_is_bitwise(tmp_path, shards, uninterrupted):
    cfg = dataclasses.replace(config(tmp_path / "run", shards, "jest", steps=5, stop_after=3), num_workers=2)
    train(cfg, progress=False)
    state = torch.load(RunDir(cfg.run_dir).latest_checkpoint(), weights_only=True)
    assert state["data"][0]["next"] == 1  # batches 1 and 3 came from worker 0: worker 1's comes next
    train(dataclasses.replace(cfg, stop_after=None), progress=False)
    assert same_run(uninterrupted(2), cfg.run_dir)


def test_a_checkpoint_without_data_position_resumes_by_replaying(tmp_path, shards, uninterrupted):
    cfg = config(tmp_path / "run", shards, "jest", steps=5, stop_after=2)
    train(cfg, progress=False)
    run = RunDir(cfg.run_dir)
    state = torch.load(run.latest_checkpoint(), weights_only=True)
    del state["data"]  # as written before jestclip recorded it
    torch.save(state, run.latest_checkpoint())
    with pytest.warns(RuntimeWarning, match="records no data position .*: replaying 2 super-batches"):
        train(dataclasses.replace(cfg, stop_after=None), progress=False)
    assert same_run(uninterrupted(0), cfg.run_dir)


def test_resume_refuses_a_data_position_of_another_world_size(tmp_path, shards):
    from jestclip.models import image_transform
    from jestclip.train.startup import Placement, open_stream, resume_batches

    cfg = config(tmp_path / "run", shards, "iid")
    stream = open_stream(cfg, shards, image_transform("jest-micro"), Placement(torch.device("cpu")))
    position = {"workers": [None], "next": 0}
    with pytest.raises(ValueError, match="data position is for 2 ranks but this run has 1: resume it on 2"):
        resume_batches(stream, cfg, 3, [position, position])
