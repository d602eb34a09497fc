"""Distributed joint selection on 2 CPU processes (gloo) equals one-process selection with per-rank groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jestclip.selection import CandidateGroups, joint_select
from jestclip.train.distributed import distributed_joint_select

from ..selection.helpers import learner_and_reference

N_PER_RANK, SIZE, WORLD = 40, 16, 2


def _worker(rank: int, store: str, out: str, loss: str, scoring: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        learner, reference = learner_and_reference(N_PER_RANK * WORLD)
        rows = torch.arange(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        local, global_ = distributed_joint_select(
            learner.take(rows),
            reference.take(rows) if scoring != "hard_learner" else None,
            size=SIZE,
            n_chunks=4,
            scoring=scoring,
            loss=loss,
            gain=5.0,
            generator=torch.Generator().manual_seed(11),
        )
        torch.save({"local": local, "global": global_}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


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
