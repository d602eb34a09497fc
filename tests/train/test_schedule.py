"""Selection schedules (train.schedule): which steps select and at what f, what the data serves each step,
what each step costs, resuming across a boundary, and runs scheduled for a FLOP budget."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jestclip.data import SuperBatchStream
from jestclip.data.loader import ResumableBatches
from jestclip.data.pool import MemoryPool
from jestclip.train.config import ConfigError, MethodConfig, apply_overrides, from_dict, to_dict
from jestclip.train.loop import train
from jestclip.train.rundir import RunDir
from jestclip.train.schedule import (
    SelectionSchedule,
    filter_ratio_at,
    run_flops,
    selecting_steps,
    steps_for_flops,
    super_batch_at,
    super_batches,
)
from jestclip.train.startup import StepCosts, scheduled_steps

from ..data.test_loader import make_shards
from .test_loop import cached_shards, config, same_run

FIRST_HALF = SelectionSchedule(end=0.5)


def sizes(schedule: SelectionSchedule, steps: int, b: int = 4, f: float = 0.5, world: int = 1) -> list[int]:
    return [
        super_batch_at(schedule, t, steps=steps, batch_size=b, filter_ratio=f, world=world)
        for t in range(steps)
    ]


# --- the schedule's forms -----------------------------------------------------------------------------------


def test_the_default_selects_every_step_at_the_runs_filter_ratio():
    assert SelectionSchedule().always and SelectionSchedule().describe() == ""
    assert sizes(SelectionSchedule(), 5, b=64, f=0.8) == [320] * 5  # B = b / (1 - f), as Method.super_batch


def test_a_window_selects_only_inside_it():
    assert selecting_steps(SelectionSchedule(end=0.25), 8) == range(0, 2)
    assert sizes(SelectionSchedule(end=0.25), 8) == [8, 8, 4, 4, 4, 4, 4, 4]
    assert sizes(SelectionSchedule(start=0.5), 4) == [4, 4, 8, 8]
    assert SelectionSchedule(end=0.25).describe() == "steps 0-25%"


def test_every_kth_step_of_the_window_selects():
    assert sizes(SelectionSchedule(every=3), 7) == [8, 4, 4, 8, 4, 4, 8]
    assert sizes(SelectionSchedule(start=0.5, every=2), 8) == [4, 4, 4, 4, 8, 4, 8, 4]


def test_an_annealed_filter_ratio_goes_linearly_from_f_to_the_final_one():
    schedule = SelectionSchedule(final_filter_ratio=0.0)
    fs = [filter_ratio_at(schedule, t, steps=5, filter_ratio=0.8) for t in range(5)]
    assert fs == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    # b = 64: B = 320, 160, 107, 80, then 64 — the last step draws b and so does not select (an IID step)
    assert sizes(schedule, 5, b=64, f=0.8) == [320, 160, 107, 80, 64]
    assert sizes(SelectionSchedule(final_filter_ratio=0.9), 2, b=64, f=0.5) == [128, 640]  # annealed up


def test_under_torchrun_each_steps_super_batch_is_a_multiple_of_the_world_size():
    got = sizes(SelectionSchedule(final_filter_ratio=0.0), 5, b=64, f=0.8, world=4)
    assert got == [320, 160, 108, 80, 64] and all(b % 4 == 0 for b in got)


schedules = st.builds(
    SelectionSchedule,
    start=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
    end=st.sampled_from([0.6, 0.75, 1.0]),
    every=st.integers(1, 4),
    final_filter_ratio=st.one_of(st.none(), st.floats(0.0, 0.95)),
)


@settings(max_examples=60, deadline=None)
@given(
    schedule=schedules,
    steps=st.integers(1, 60),
    b=st.sampled_from([1, 4, 64]),
    f=st.floats(0.0, 0.95),
    world=st.sampled_from([1, 2, 4]),
)
def test_the_vectorised_sizes_are_the_per_step_ones(schedule, steps, b, f, world):
    b *= world
    expected = sizes(schedule, steps, b=b, f=f, world=world)
    assert (
        super_batches(schedule, steps=steps, batch_size=b, filter_ratio=f, world=world).tolist() == expected
    )
    assert all(size >= b and size % world == 0 for size in expected)
    # outside the window nothing selects
    window = selecting_steps(schedule, steps)
    assert all(expected[t] == b for t in range(steps) if t not in window)


# --- the config ---------------------------------------------------------------------------------------------


def test_a_schedule_is_one_part_of_the_methods_config(tmp_path):
    cfg = apply_overrides(config(tmp_path, ["x.tar"], "jest"), ["method.schedule.end=0.25", "steps=8"])
    assert cfg.method.schedule == SelectionSchedule(end=0.25)
    assert [cfg.super_batch_at(t) for t in range(8)] == [8, 8] + [4] * 6
    assert from_dict(to_dict(cfg)) == cfg  # it round-trips through config.json
    saved = to_dict(cfg)
    del saved["method"]["schedule"]  # a config written before schedules existed: every step selects
    assert from_dict(saved).method.schedule.always


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method.schedule.end=0.25"],
            "method.schedule = 'steps 0-25%' is set but method 'iid' does not select",
        ),
        (["method.method=jest", "method.schedule.start=0.5", "method.schedule.end=0.5"], "must be > method"),
        (["method.method=jest", "method.schedule.every=0"], r"method.schedule.every = 0 must be >= 1"),
        (["method.method=jest", "method.schedule.final_filter_ratio=1.0"], r"must be in \[0, 1\)"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_it(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(config(tmp_path, ["x.tar"], "iid"), overrides)


# --- the data serves each step's B: no sample dropped or repeated -------------------------------------------


def step_sizes(n: int, pattern: list[int]):
    """A picklable ``batch_sizes``: ``pattern`` repeated."""
    return [pattern[t % len(pattern)] for t in range(n)].__getitem__


def test_the_pool_serves_each_steps_size_and_every_sample_once_per_epoch(tmp_path):
    urls = make_shards(tmp_path, 3, 7)  # 21 samples
    per_step = step_sizes(200, [8, 3, 3, 5, 8, 2])
    stream = SuperBatchStream(urls, batch_size=8, batch_sizes=per_step, shuffle_shards=False)
    pool = MemoryPool.from_stream(stream)
    batches = pool.batches()
    served = [next(batches) for _ in range(60)]
    assert [len(b) for b in served] == [per_step(t) for t in range(60)]
    keys = [k for b in served for k in b.keys]
    for epoch in range(len(keys) // 21):  # epochs laid end to end: each a permutation of the pool
        assert sorted(keys[21 * epoch : 21 * (epoch + 1)]) == sorted(pool.keys)
    assert all(len(set(b.keys)) == len(b) for b in served)  # no repeat inside a straddling super-batch
    # a recorded position continues exactly, and says which super-batch comes next
    again = pool.batches(served[36].position)
    assert served[36].position["batch"] == 37
    assert [next(again).keys for _ in range(10)] == [b.keys for b in served[37:47]]


def test_a_resumed_schedule_without_batch_index_is_refused(tmp_path):
    urls = make_shards(tmp_path, 3, 7)
    stream = SuperBatchStream(urls, batch_size=8, batch_sizes=step_sizes(10, [8, 4]), shuffle_shards=False)
    pool = MemoryPool.from_stream(stream)
    position = next(pool.batches()).position
    del position["batch"]
    with pytest.raises(ValueError, match="no batch index"):
        pool.batches(position)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_stream_serves_each_steps_size_and_every_sample_once_per_epoch(tmp_path, num_workers):
    urls = make_shards(tmp_path, 4, 6)  # 24 samples: 12 per loader worker with two
    per_step = step_sizes(100, [4, 1, 3, 2, 4])
    stream = SuperBatchStream(urls, batch_size=4, batch_sizes=per_step, resampled=True, seed=1)
    batches = ResumableBatches(stream, num_workers)
    served = [next(batches) for _ in range(40)]
    assert [len(b) for b in served] == [per_step(t) for t in range(40)]
    # each worker reads each of its samples once per epoch, whatever the sizes: counts differ by at most one
    counts = Counter(k for b in served for k in b.keys)
    assert set(counts) == {f"s{s}_{i:03d}" for s in range(4) for i in range(6)}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all(len(set(b.keys)) == len(b) for b in served)
    # a recorded position continues exactly
    position = batches.position()
    resumed = ResumableBatches(stream, num_workers, position)
    fresh = [next(batches).keys for _ in range(10)]
    assert [next(resumed).keys for _ in range(10)] == fresh


# --- a scheduled run: steps, FLOPs, resume ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return cached_shards(tmp_path_factory.mktemp("shards"), 2, 12)


def scheduled(run_dir: Path, shards: list[str], method: str, schedule: SelectionSchedule, **kw):
    cfg = config(run_dir, shards, method, **kw)
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, schedule=schedule))


def lines(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["jest", "flexi-jest"])
def test_steps_outside_the_schedule_are_iid_steps_and_cost_an_iid_step(tmp_path, shards, method):
    cfg = scheduled(tmp_path / "run", shards, method, FIRST_HALF, steps=4)
    train(cfg, progress=False)
    logged = lines(cfg.run_dir)
    scored = [x["examples_scored"] for x in logged]
    assert scored == [8, 16, 16, 16]  # B = 8 candidates scored on steps 1-2, none after
    assert [x["selected_score"] is not None for x in logged] == [True, True, False, False]
    costs = StepCosts.measure(cfg)
    iid = dataclasses.replace(cfg, method=MethodConfig("iid", batch_size=4))
    per_step = [logged[0]["flops_total"]] + [
        b["flops_total"] - a["flops_total"] for a, b in itertools.pairwise(logged)
    ]
    assert per_step == pytest.approx([costs.total(8)] * 2 + [StepCosts.measure(iid).total(4)] * 2)
    assert costs.total(4) == pytest.approx(StepCosts.measure(iid).total(4))  # B = b: an IID step's cost
    assert logged[-1]["examples_learned"] == 16


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_a_scheduled_run_resumes_bitwise_across_the_boundary(tmp_path, shards, memory, stop_after):
    schedule = SelectionSchedule(end=0.5, final_filter_ratio=0.25)  # B = 8, 6, then IID steps of 4
    whole = scheduled(tmp_path / "whole", shards, "jest", schedule, steps=5, data_in_memory=memory)
    assert [whole.super_batch_at(t) for t in range(5)] == [8, 5, 4, 4, 4]
    train(whole, progress=False)
    parts = dataclasses.replace(whole, run_dir=str(tmp_path / "parts"), stop_after=stop_after)
    train(parts, progress=False)
    state = torch.load(RunDir(parts.run_dir).latest_checkpoint(), weights_only=True)
    assert state["counters"]["step"] == stop_after
    train(dataclasses.replace(parts, stop_after=None), progress=False)
    assert same_run(whole.run_dir, parts.run_dir)


def test_a_run_scheduled_for_a_flop_budget_takes_the_most_steps_that_fit(tmp_path, shards):
    iid = config(tmp_path, shards, "iid", steps=30)
    budget = 30 * StepCosts.measure(iid).total(4)  # IID's total over 30 steps
    jest = config(tmp_path, shards, "jest")  # B = 8, b = 4
    costs = StepCosts.measure(jest)
    assert scheduled_steps(jest, budget) == int(budget // costs.total(8))
    early = scheduled(tmp_path, shards, "jest", SelectionSchedule(end=0.25))
    n = scheduled_steps(early, budget)

    def total(steps: int) -> float:
        sizes_ = super_batches(early.method.schedule, steps=steps, batch_size=4, filter_ratio=0.5)
        return run_flops(sizes_, costs.total)

    assert total(n) <= budget < total(n + 1)
    assert 30 > n > int(budget // costs.total(8))  # between IID's steps and always-JEST's
    assert scheduled_steps(iid, budget) == 30


def test_steps_for_flops_refuses_a_budget_below_one_step():
    with pytest.raises(ValueError, match="does not cover one step"):
        steps_for_flops(5.0, lambda size: 10.0 * size, SelectionSchedule(), batch_size=4, filter_ratio=0.5)


def test_reports_name_a_scheduled_run_by_its_schedule(tmp_path, shards):
    from jestclip.report import load_run

    cfg = scheduled(tmp_path / "run", shards, "jest", SelectionSchedule(end=0.5, every=2), steps=2)
    train(cfg, progress=False)
    assert load_run(cfg.run_dir).label == "jest (steps 0-50%, every 2)"
    plain = config(tmp_path / "plain", shards, "jest", steps=1)
    train(plain, progress=False)
    assert load_run(plain.run_dir).label == "jest"


@pytest.mark.parametrize("memory", [False, True])
def test_a_scheduled_run_on_two_ranks(tmp_path, memory):
    import torch.multiprocessing as mp

    from .test_distributed import WORLD, _train_worker

    urls = cached_shards(tmp_path / "shards", 4, 8)
    schedule = SelectionSchedule(end=0.5, final_filter_ratio=0.25)  # B = 8, then 6 (a multiple of 2), then 4
    cfg = scheduled(tmp_path / "run", urls, "jest", schedule, steps=4, data_in_memory=memory)
    mp.spawn(_train_worker, args=(str(tmp_path / "store"), cfg), nprocs=WORLD, join=True)
    logged = lines(cfg.run_dir)
    assert [x["examples_scored"] for x in logged] == [8, 14, 14, 14]
    assert logged[-1]["examples_learned"] == 16 and all(x["skipped_updates"] == 0 for x in logged)
