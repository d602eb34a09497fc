"""experiments/study3.py: Study III's steps as data, scheduled for IID's FLOPs, and its decision rule."""

from __future__ import annotations

import json
import re

import pytest

from experiments import study3
from jestclip.report.compare import verdict
from jestclip.train.config import apply_overrides, load_recipe
from jestclip.train.schedule import super_batches
from jestclip.train.startup import StepCosts

from .test_study2 import ROOT


@pytest.fixture(scope="module")
def configs():
    base = load_recipe(ROOT / study3.RECIPE)
    steps = study3.steps()
    return {n: apply_overrides(base, s.command[3:]) for n, s in steps.items() if s.command[1] == "train"}


def test_every_run_has_its_own_run_dir_and_the_seed_of_its_name(configs):
    run_dirs = [cfg.run_dir for cfg in configs.values()]
    assert len(run_dirs) == len(set(run_dirs))
    for name, cfg in configs.items():
        assert cfg.data_in_memory and cfg.model == "jest-micro" and cfg.method.batch_size == 64
        if not name.startswith("ref-"):
            assert cfg.seed == int(name.rsplit("-s", 1)[1])
            assert cfg.data == study3.POOLS[re.search(r"-(natural|swap50)-", name).group(1)]


def test_compute_matched_runs_are_scheduled_for_iids_flops_and_no_further(configs):
    iid = configs["iid-natural-s3"]
    assert iid.steps == study3.IID_STEPS
    budget = study3.budget()
    assert budget == pytest.approx(1.0730373e13, rel=1e-6)  # Study II's IID runs logged 10730373120000
    for name, cfg in configs.items():
        if not any(name.startswith(m) for m in (*study3.MATCHED, *study3.PILOT)):
            continue
        costs = StepCosts.measure(cfg)

        def total(steps: int, cfg=cfg, costs=costs) -> float:
            sizes = super_batches(
                cfg.method.schedule, steps=steps, batch_size=64, filter_ratio=cfg.filter_ratio
            )
            return sum(costs.total(int(b)) for b in sizes)

        assert total(cfg.steps) <= budget < total(cfg.steps + 1), name
    assert configs["jest-f08-iidflops-swap50-s0"].steps == 1125  # 3,000 x 1 / (8/3)
    assert configs["flexi-jest-f08-iidflops-natural-s1"].steps == 2247


def test_the_pilot_forms_are_the_registered_ones(configs):
    first = configs["jest-first25-swap50-s5"]
    assert first.method.schedule.end == 0.25 and first.method.method == "jest"
    anneal = configs["jest-anneal-swap50-s5"]
    assert anneal.method.schedule.final_filter_ratio == 0.0 and anneal.filter_ratio == 0.8
    keep = configs["flexi-jest-keep50-swap50-s5"]
    assert keep.keep_list == "runs/study2/keep/swap50-strong-q50" and keep.method.method == "flexi-jest"
    assert {n for n in configs if n.endswith("-s5")} == {f"{m}-swap50-s5" for m in study3.PILOT}


def test_the_decision_rule_is_twice_the_larger_seed_sd():
    assert verdict([20.0, 21.0, 22.0], [17.0, 17.5, 18.0]).word == "above"  # +3.5 > 2 x 1.0
    assert verdict([20.0, 21.0, 22.0], [19.0, 19.5, 20.0]).word == "level"  # +1.5 < 2 x 1.0
    assert verdict([17.0, 17.5, 18.0], [20.0, 21.0, 22.0]).word == "below"
    assert verdict([20.0], [17.0, 18.0]).word == "no verdict"
    assert str(verdict([20.0, 21.0, 22.0], [17.0, 17.5, 18.0])) == "above (+3.50, margin 2.00)"


def _finished(root, name: str, final: float, wall_s: float = 600.0) -> None:
    """results/study3/NAME with a config and the last training and evaluation lines."""
    out = root / study3.RESULTS / name
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    lines = [
        {"step": 100, "wall_s": wall_s},
        {"step": 100, "eval/average": final / 2, "eval/gallery_r5": final},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_decisive_method_is_the_best_mean_of_pool_means_over_seeds_0_to_2(tmp_path):
    # natural / swapped means: JEST 0.15 / 0.15, Flexi-JEST 0.20 / 0.14, the chosen form 0.16 / 0.17
    # -> pool means 0.150, 0.170, 0.165; seeds 3-4 and the pilot's seed 5 take no part
    values = {"jest-f08-iidflops": (0.15, 0.15), "flexi-jest-f08-iidflops": (0.20, 0.14)}
    values[study3.CHOSEN] = (0.16, 0.17)
    for name, (natural, swapped) in values.items():
        for seed in study3.MAIN_SEEDS:
            _finished(tmp_path, f"{name}-natural-s{seed}", natural + 0.01 * (seed - 1))
            if (name, seed) != ("jest-f08-iidflops", 2):
                _finished(tmp_path, f"{name}-swap50-s{seed}", swapped)
    _finished(tmp_path, "jest-f08-iidflops-swap50-s3", 0.90)  # a seed outside 0-2: not read
    _finished(tmp_path, f"{study3.CHOSEN}-swap50-s5", 0.90)  # the pilot: not read
    best, means, missing = study3.best_candidate(tmp_path)
    assert best is None and missing == ["jest-f08-iidflops-swap50-s2"]
    _finished(tmp_path, "jest-f08-iidflops-swap50-s2", 0.15)
    best, means, missing = study3.best_candidate(tmp_path)
    assert best == "flexi-jest-f08-iidflops" and not missing
    assert means == pytest.approx(
        {"jest-f08-iidflops": 15.0, "flexi-jest-f08-iidflops": 17.0, study3.CHOSEN: 16.5}
    )
    assert study3.cpu_hours(tmp_path) == (20, pytest.approx(20 * 600 / 3600))  # every seed counts
