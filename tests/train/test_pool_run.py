"""Training from a memory-resident pool (``data_in_memory=True``): resumes bitwise, on one or two ranks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from jestclip.train.loop import train
from jestclip.train.rundir import RunDir

from .test_distributed import WORLD, _train_worker
from .test_loop import cached_shards, config, same_run


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return cached_shards(tmp_path_factory.mktemp("shards"), 3, 7)  # 21 samples, B = 8: epochs straddle


def pool_config(run_dir: Path, shards: list[str], method: str, **kw):
    return dataclasses.replace(config(run_dir, shards, method, **kw), data_in_memory=True)


def lines(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["iid", "jest"])
def test_a_pool_run_resumes_bitwise(tmp_path, shards, method):
    whole = pool_config(tmp_path / "whole", shards, method, steps=7)  # 7 x 8 samples: 2.7 epochs
    train(whole, progress=False)
    parts = pool_config(tmp_path / "parts", shards, method, steps=7, stop_after=3)
    train(parts, progress=False)
    state = torch.load(RunDir(parts.run_dir).latest_checkpoint(), weights_only=True)
    (position,) = state["data"]
    expected = {"iid": (0, 12), "jest": (1, 3)}[method]  # B = 4 (IID) or 8: 3 x 8 = 24 = 21 + 3
    assert (position["kind"], position["epoch"], position["index"]) == ("pool", *expected)
    train(dataclasses.replace(parts, stop_after=None), progress=False)
    assert same_run(whole.run_dir, parts.run_dir)
    assert lines(whole.run_dir)[-1]["examples_learned"] == 28


def test_switching_to_memory_on_resume_is_refused(tmp_path, shards):
    cfg = config(tmp_path / "run", shards, "iid", stop_after=1)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"different config \(\['data_in_memory'\]\)"):
        train(dataclasses.replace(cfg, data_in_memory=True, stop_after=None), progress=False)


def test_a_pool_run_on_two_ranks_records_one_position_and_resumes_only_on_two(tmp_path, shards):
    cfg = pool_config(tmp_path / "run", shards, "jest", steps=4, stop_after=3)
    mp.spawn(_train_worker, args=(str(tmp_path / "store"), cfg), nprocs=WORLD, join=True)
    state = torch.load(RunDir(cfg.run_dir).latest_checkpoint(), weights_only=True)
    first, second = state["data"]
    assert first == second and (first["world_size"], first["epoch"], first["index"]) == (2, 1, 3)
    assert [x["step"] for x in lines(cfg.run_dir)] == [1, 2, 3]
    with pytest.raises(ValueError, match="data position is for 2 ranks but this run has 1: resume it on 2"):
        train(dataclasses.replace(cfg, stop_after=None), progress=False)
    mp.spawn(
        _train_worker,
        args=(str(tmp_path / "store2"), dataclasses.replace(cfg, stop_after=None)),
        nprocs=WORLD,
        join=True,
    )
    assert lines(cfg.run_dir)[-1]["step"] == 4 and (Path(cfg.run_dir) / "model.pt").exists()


def test_open_stream_picks_the_pool_and_a_checkpoint_without_position_starts_where_its_steps_end(
    tmp_path, shards, capsys
):
    from jestclip.data import SuperBatchStream
    from jestclip.data.pool import MemoryPool
    from jestclip.models import image_transform
    from jestclip.train.startup import Placement, open_stream, resume_batches

    cfg, where = pool_config(tmp_path / "run", shards, "jest"), Placement(torch.device("cpu"))
    transform = image_transform("jest-micro")
    pool = open_stream(cfg, shards, transform, where, progress=True)
    assert isinstance(pool, MemoryPool) and (len(pool), pool.batch_size) == (21, 8)
    assert "pool: 21 samples from 3 shards in memory (" in capsys.readouterr().err  # the summary line
    finite = open_stream(cfg, shards, transform, where, batch_size=5, resampled=False)  # diagnostics' pass
    assert isinstance(finite, SuperBatchStream)
    expected = [next(b) for b in [pool.batches()] for _ in range(7)]
    with pytest.warns(RuntimeWarning, match=r"records no data position .*: starting the pool after 5 "):
        batches = resume_batches(pool, cfg, 5)
    assert batches.position() == pool.position_after(5) == expected[4].position
    assert [next(batches).keys for _ in range(2)] == [b.keys for b in expected[5:]]
