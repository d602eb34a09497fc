"""Distributed joint selection on 2 CPU processes (gloo) equals one-process selection with per-rank groups."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jestclip.selection import CandidateGroups, LocalExchange, independent_select, joint_select
from jestclip.train.distributed import distributed_independent_select, distributed_joint_select

from ..selection.helpers import learner_and_reference

N_PER_RANK, SIZE, WORLD = 40, 16, 2


@contextmanager
def process_group(rank: int, store: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, store: str, out: str, loss: str, scoring: str) -> None:
    with process_group(rank, store):
        learner, reference = learner_and_reference(N_PER_RANK * WORLD)
        rows = torch.arange(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        shard = (learner.take(rows), reference.take(rows) if scoring != "hard_learner" else None)
        kwargs = dict(size=SIZE, scoring=scoring, loss=loss, gain=5.0)
        local, global_ = distributed_joint_select(
            *shard, n_chunks=4, generator=torch.Generator().manual_seed(11), **kwargs
        )
        independent = distributed_independent_select(
            *shard, generator=torch.Generator().manual_seed(11), **kwargs
        )
        torch.save({"local": local, "global": global_, "independent": independent}, f"{out}.{rank}")


@pytest.mark.parametrize(("loss", "scoring"), [("sigmoid", "learnability"), ("softmax", "hard_learner")])
def test_two_ranks_select_the_same_indices_as_one_process(tmp_path, loss, scoring):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, loss, scoring), nprocs=WORLD, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    assert torch.equal(results[0]["global"], results[1]["global"])  # every rank agrees
    selection = results[0]["global"]
    assert selection.unique().numel() == SIZE
    for rank, result in enumerate(results):  # each rank trains on exactly its quota of what it holds
        assert result["local"].numel() == SIZE // WORLD
        assert torch.equal(
            torch.sort(result["local"] + rank * N_PER_RANK).values,
            torch.sort(selection[selection // N_PER_RANK == rank]).values,
        )
    learner, reference = learner_and_reference(N_PER_RANK * WORLD)
    groups = CandidateGroups(torch.arange(N_PER_RANK * WORLD) // N_PER_RANK, [SIZE // WORLD] * WORLD)
    single = joint_select(
        learner,
        reference if scoring != "hard_learner" else None,
        size=SIZE,
        n_chunks=4,
        scoring=scoring,
        loss=loss,
        gain=5.0,
        generator=torch.Generator().manual_seed(11),
        groups=groups,
    )
    assert torch.equal(selection, single)
    # independent selection: each rank's top quota of its slice of the same perturbed scores
    grouped = independent_select(
        learner,
        reference if scoring != "hard_learner" else None,
        size=SIZE,
        scoring=scoring,
        loss=loss,
        gain=5.0,
        generator=torch.Generator().manual_seed(11),
        exchange=LocalExchange(groups),
    )
    for rank, result in enumerate(results):
        assert torch.equal(result["independent"] + rank * N_PER_RANK, grouped[grouped // N_PER_RANK == rank])


def _grad_worker(rank: int, store: str, out: str) -> None:
    from jestclip.models import create_model
    from jestclip.train import MethodConfig, run_step
    from jestclip.train.distributed import average_gradients

    from .test_steps import synthetic_batch

    with process_group(rank, store):
        torch.manual_seed(0)
        model = create_model("jest-micro")
        full = synthetic_batch(8)
        half = slice(rank * 4, (rank + 1) * 4)
        shard = type(full)(full.images[half], full.tokens[half], None)
        run_step(model, shard, MethodConfig("iid", batch_size=8), world_size=WORLD).loss.backward()
        average_gradients(model.parameters())
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, f"{out}.{rank}")


def test_data_parallel_gradients_equal_single_process_gradients(tmp_path):
    """Two ranks with half a batch each, features gathered, gradients averaged: one process, whole batch."""
    from jestclip.models import create_model
    from jestclip.train import MethodConfig, run_step

    from .test_steps import synthetic_batch

    out = str(tmp_path / "grads")
    mp.spawn(_grad_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    grads = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(0)
    model = create_model("jest-micro")
    run_step(model, synthetic_batch(8), MethodConfig("iid", batch_size=8)).loss.backward()
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        torch.testing.assert_close(grads[0][name], param.grad, rtol=1e-4, atol=1e-6)
        assert torch.equal(grads[0][name], grads[1][name])


def _train_worker(rank: int, store: str, cfg) -> None:
    from jestclip.train.loop import train

    with process_group(rank, store):
        train(cfg, progress=False)


@pytest.mark.parametrize("method", ["jest", "flexi-jest"])
def test_two_process_training_run(tmp_path, method):
    import json
    from pathlib import Path

    from .test_loop import cached_shards, config

    urls = cached_shards(tmp_path / "shards", 4, 8)
    cfg = config(tmp_path / "run", urls, method, steps=3, checkpoint_every=2)
    mp.spawn(_train_worker, args=(str(tmp_path / "store"), cfg), nprocs=WORLD, join=True)
    lines = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # written once, by rank 0
    assert lines[-1]["examples_learned"] == 12 and lines[-1]["examples_scored"] == 24
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert (Path(cfg.run_dir) / "model.pt").exists()
