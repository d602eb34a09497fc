"""Data parallelism on 2 CPU processes (gloo): distributed joint selection equals one-process selection with
per-rank groups (and is what the selector registry runs under torch.distributed); DDP learning with
open_clip's distributed losses equals one-process learning."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from jestclip.selection import (
    SELECTORS,
    CandidateGroups,
    LocalExchange,
    distributed_independent_select,
    distributed_joint_select,
    independent_select,
    joint_select,
)

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
        # the registry runs each selector's distributed form under torch.distributed
        settings = SimpleNamespace(
            n_chunks=4, independent_context="unconditional", independent_method="sample"
        )
        for name, expected in (("joint", local), ("independent", independent)):
            chosen = SELECTORS[name].select(
                *shard, settings, generator=torch.Generator().manual_seed(11), world_size=WORLD, **kwargs
            )
            assert torch.equal(chosen, expected), name
        explicit = distributed_joint_select(  # the chunk-update backend reaches the distributed form too
            *shard, n_chunks=4, generator=torch.Generator().manual_seed(11), backend="torch", **kwargs
        )
        assert torch.equal(explicit[1], global_)
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


def _shard(batch, rank: int):
    """Rank ``rank``'s half of a super-batch (the candidates a data-parallel rank holds)."""
    n = len(batch) // WORLD
    rows = torch.arange(rank * n, (rank + 1) * n)
    reference = batch.reference.take(rows) if batch.reference is not None else None
    return type(batch)(batch.images[rows], batch.tokens[rows], reference)


def _grad_worker(rank: int, store: str, out: str, cfg, n: int) -> None:
    from jestclip.models import create_model
    from jestclip.train import run_step
    from jestclip.train.distributed import data_parallel

    from .test_steps import synthetic_batch

    with process_group(rank, store):
        torch.manual_seed(0)
        model = create_model("jest-micro", loss=cfg.loss)
        learn_module = data_parallel(model, torch.device("cpu"))
        shard = _shard(synthetic_batch(n), rank)
        step = run_step(
            model, shard, cfg, torch.Generator().manual_seed(3), world_size=WORLD, learn_module=learn_module
        )
        step.loss.backward()  # DDP averages the gradients
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save({"grads": grads, "loss": step.loss.detach(), "selected": step.selected}, f"{out}.{rank}")


def _run_ranks(tmp_path, cfg, n: int) -> list[dict]:
    out = str(tmp_path / "grads")
    mp.spawn(_grad_worker, args=(str(tmp_path / "store"), out, cfg, n), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


def _assert_single_process_gradients(results: list[dict], model, loss) -> None:
    """Every rank's averaged gradients and reported loss equal those of one process on the whole selection."""
    loss.backward()
    for name, param in model.named_parameters():
        assert results[0]["grads"][name] is not None, name
        # float32 sums in another order (two ranks, thread counts): an element near zero was seen 1.8e-6 off
        torch.testing.assert_close(results[0]["grads"][name], param.grad, rtol=1e-4, atol=1e-5)
        assert torch.equal(results[0]["grads"][name], results[1]["grads"][name])
    for result in results:
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("method", ["iid", "drrho"])
def test_data_parallel_gradients_equal_single_process_gradients(tmp_path, method, loss):
    """Two DDP ranks with half a batch each, each computing its share of its method's loss (iid: open_clip's
    distributed losses; drrho: the steered loss, the learner's and the reference's rows all-gathered): the
    averaged gradients (and the reported loss) are those of one process on the whole batch."""
    from jestclip.models import create_model
    from jestclip.train import MethodConfig, run_step

    from .test_steps import synthetic_batch

    cfg = MethodConfig(method, batch_size=8, loss=loss)
    results = _run_ranks(tmp_path, cfg, 8)
    torch.manual_seed(0)
    model = create_model("jest-micro", loss=loss)
    _assert_single_process_gradients(results, model, run_step(model, synthetic_batch(8), cfg).loss)


def test_data_parallel_jest_step_equals_single_process_step(tmp_path):
    """A JEST step on two ranks (16 candidates each, 4 picks each) selects what one process selects with one
    group per rank, and learns with the gradients of one process learning on that selection."""
    from jestclip.models import create_model
    from jestclip.train import MethodConfig, run_step
    from jestclip.train.steps import score_embeddings

    from .test_steps import synthetic_batch

    cfg = MethodConfig("jest", batch_size=8, n_chunks=2, gain=1.0)
    results = _run_ranks(tmp_path, cfg, 32)
    torch.manual_seed(0)
    model = create_model("jest-micro")
    batch = synthetic_batch(32)
    groups = CandidateGroups(torch.arange(32) // 16, [4, 4])
    single = joint_select(
        score_embeddings(model, batch, None),
        batch.reference,
        size=8,
        n_chunks=2,
        gain=1.0,
        generator=torch.Generator().manual_seed(3),
        groups=groups,
    )
    chosen = torch.cat([r["selected"] + rank * 16 for rank, r in enumerate(results)])  # rank order
    assert torch.equal(torch.sort(chosen).values, torch.sort(single).values)
    picked = type(batch)(batch.images[chosen], batch.tokens[chosen], None)
    loss = run_step(model, picked, MethodConfig("iid", batch_size=8)).loss
    _assert_single_process_gradients(results, model, loss)


def _overlap_worker(rank: int, store: str, out: str, cfg) -> None:
    """Two updates through ``build_state`` and ``learn``, recording each gradient bucket's all-reduce."""
    from jestclip.train.loop import learn
    from jestclip.train.startup import Placement, build_state

    from .test_steps import synthetic_batch

    with process_group(rank, store):
        state = build_state(cfg, torch.device("cpu"))
        params = list(state.model.parameters())
        calls = [[], []]  # per step: DDP rebuilds its buckets in backward's order after the first

        def recording_hook(_, bucket):
            calls[state.counters.step].append(
                {
                    "in_backward": torch._C._current_autograd_node() is not None,
                    "grads_to_compute": sum(p.grad is None for p in params),
                    "bucket_params": len(bucket.parameters()),
                }
            )
            return default_hooks.allreduce_hook(None, bucket)

        state.learn_module.register_comm_hook(None, recording_hook)
        bad = []
        for step in range(2):
            where = Placement(torch.device("cpu"), rank, WORLD)
            bad.append(learn(state, _shard(synthetic_batch(4, seed=step), rank), cfg, where).bad)
            state.counters.step += 1
        weights = {n: p.detach() for n, p in state.model.named_parameters()}
        torch.save({"calls": calls, "bad": bad, "weights": weights, "n": len(params)}, f"{out}.{rank}")


def test_gradients_are_all_reduced_while_backward_runs(tmp_path):
    """Under torchrun the training state learns through DDP: gradient buckets are all-reduced during the
    backward pass, the first while gradients remain to be computed (communication overlaps compute), and
    the ranks make the same update."""
    from .test_loop import config

    cfg = config(tmp_path / "run", [str(tmp_path / "shard-0.tar")], "iid")
    out = str(tmp_path / "overlap")
    mp.spawn(_overlap_worker, args=(str(tmp_path / "store"), out, cfg), nprocs=WORLD, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for result in results:
        assert result["bad"] == [None, None]
        for calls in result["calls"]:
            assert all(c["in_backward"] for c in calls)
            assert sum(c["bucket_params"] for c in calls) == result["n"]  # each gradient reduced once
        second = result["calls"][1]
        assert len(second) >= 2 and second[0]["grads_to_compute"] > 0  # all-reduced before backward ended
    for name, weight in results[0]["weights"].items():
        assert torch.equal(weight, results[1]["weights"][name]), name


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


def _train_worker_catching(rank: int, store: str, cfg, out: str) -> None:
    from jestclip.train.loop import train

    with process_group(rank, store):
        try:
            train(cfg, progress=False)
        except ValueError as exn:
            Path(f"{out}.rank{rank}").write_text(str(exn))


def test_each_rank_opens_only_its_own_shards_sidecars_and_a_missing_one_stops_every_rank(tmp_path):
    """Startup reads what this rank's stream reads, not the pool (a 10^5-shard pool opened every header on
    every rank); a sidecar missing on one rank's shards is then that rank's to find, and every rank stops."""
    from jestclip.data.refcache import sidecar_path
    from jestclip.train.startup import Placement, _rank_shards

    from .test_loop import cached_shards, config

    urls = cached_shards(tmp_path / "shards", 4, 8)
    cfg = config(tmp_path / "run", urls, "jest", steps=2)
    own = [_rank_shards(cfg, urls, Placement(torch.device("cpu"), rank, WORLD)) for rank in range(WORLD)]
    assert [len(shards) for shards in own] == [2, 2] and not set(own[0]) & set(own[1])
    sidecar_path(own[1][0], "reference").unlink()  # one of rank 1's shards lost its sidecar
    out = tmp_path / "err"
    mp.spawn(_train_worker_catching, args=(str(tmp_path / "store"), cfg, str(out)), nprocs=WORLD, join=True)
    first, second = (Path(f"{out}.rank{r}").read_text() for r in range(WORLD))
    assert second.startswith(f"no cached 'reference' embeddings for shard {own[1][0]}")
    assert first == f"rank 1: SidecarError: {second}"  # rank 0's own shards are fine: it stops with rank 1
