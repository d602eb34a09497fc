"""experiments/study2.py: Study II's steps as data and its summary of finished runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import study2
from experiments.steps import with_needs
from jestclip.train.config import apply_overrides, load_recipe, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return study2


@pytest.fixture(scope="module")
def listed() -> list[tuple[str, list[str]]]:
    """(name, command) of every line `study2.py --list` prints."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "experiments.study2", "--list"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return [(line.split()[0], line.split()[1:]) for line in done.stdout.splitlines()]


def test_every_listed_training_command_is_a_valid_config_with_its_own_run_dir(listed, study):
    names = [name for name, _ in listed]
    assert len(names) == len(set(names)) == len(study.STEPS)
    base = load_recipe(ROOT / study.RECIPE)
    run_dirs = []
    for name, command in listed:
        if command[:2] != ["jestclip", "train"]:
            continue
        assert command[2] == study.RECIPE
        cfg = apply_overrides(base, command[3:])  # raises on an unknown key or a bad value
        assert cfg.run_dir == f"runs/study2/{name}" and cfg.data_in_memory
        assert name.startswith("ref-") or cfg.seed == int(name.rsplit("-s", 1)[1])
        run_dirs.append(cfg.run_dir)
    # 2 references; 6 IID; per pool, 13 with the strong reference and 7 with the weak one
    assert len(run_dirs) == len(set(run_dirs)) == 2 + 6 + 2 * (13 + 7)


def configs(listed, study) -> dict[str, object]:
    base = load_recipe(ROOT / study.RECIPE)
    return {n: apply_overrides(base, c[3:]) for n, c in listed if c[:2] == ["jestclip", "train"]}


def test_the_run_list_is_the_issues(listed, study):
    cfgs = configs(listed, study)
    seeds: dict[str, int] = {}
    for name in cfgs:
        group = re.sub(r"-s\d+$", "", name)
        seeds[group] = seeds.get(group, 0) + 1
    methods = ["filter-q50", "filter-q20", "drrho", "jest-f08", "easy-reference-f08", "independent-f08"]
    methods.append("flexi-jest-f08")
    three = {"iid-natural", "iid-swap50"} | {
        f"{m}-{p}-strong" for m in ("filter-q50", "drrho", "jest-f08") for p in ("natural", "swap50")
    }
    expected = {"ref-weak": 1, "ref-strong": 1, "iid-natural": 3, "iid-swap50": 3}
    for method in methods:
        for pool in ("natural", "swap50"):
            for ref in ("strong", "weak"):
                group = f"{method}-{pool}-{ref}"
                expected[group] = 3 if group in three else 1
    assert seeds == expected
    # the pools, the references' data and the methods' settings
    assert cfgs["ref-weak"].data == "data/bench/curated" and cfgs["ref-strong"].data == "data/bench/pool"
    iid = cfgs["iid-swap50-s1"]
    assert (iid.data, iid.method.method) == ("data/bench/pool-swap50", "iid")
    jest = cfgs["jest-f08-natural-weak-s0"]
    assert (jest.method.method, jest.filter_ratio, jest.reference_cache) == ("jest", 0.8, "study2-weak")
    easy = cfgs["easy-reference-f08-swap50-strong-s0"]
    assert (easy.method.scoring, easy.reference_cache, easy.data) == (
        "easy_reference",
        "study2-strong",
        "data/bench/pool-swap50",
    )
    assert cfgs["flexi-jest-f08-swap50-weak-s0"].method.method == "flexi-jest"
    assert cfgs["independent-f08-natural-strong-s0"].method.method == "independent"
    assert cfgs["drrho-swap50-strong-s2"].method.method == "drrho"
    kept = cfgs["filter-q20-swap50-weak-s0"]
    assert (kept.method.method, kept.keep_list) == ("filter", "runs/study2/keep/swap50-weak-q20")
    assert all(c.model == load_recipe(ROOT / study.RECIPE).model for c in cfgs.values())


def test_preparation_caches_each_reference_on_each_pool_and_filters_with_it(listed, study):
    commands = dict(listed)
    cache = commands["cache-strong-swap50"]
    assert cache[:3] == ["jestclip", "cache-reference", "data/bench/pool-swap50"]
    assert cache[cache.index("--checkpoint") + 1] == "runs/study2/ref-strong/model.pt"
    assert cache[cache.index("--name") + 1] == "study2-strong"
    assert cache[cache.index("--model") + 1] == load_recipe(ROOT / study.RECIPE).model
    keep = commands["keep-natural-weak-q50"]
    assert keep == [
        "jestclip",
        "filter",
        "data/bench/pool",
        "--keep",
        "0.5",
        "--out",
        "runs/study2/keep/natural-weak-q50",
        "--reference-cache",
        "study2-weak",
    ]
    # a step's needs come first, each once
    order = with_needs(study.STEPS, ["filter-q50-natural-weak-s0", "jest-f08-natural-weak-s0"])
    assert order == [
        "ref-weak",
        "cache-weak-natural",
        "keep-natural-weak-q50",
        "filter-q50-natural-weak-s0",
        "jest-f08-natural-weak-s0",
    ]


def test_a_step_is_done_when_its_result_is_complete(tmp_path, study):
    run = study.STEPS["iid-natural-s0"]
    assert not run.done(tmp_path)
    (tmp_path / run.run_dir).mkdir(parents=True)
    (tmp_path / run.run_dir / "checkpoint-250.pt").write_bytes(b"")
    assert not run.done(tmp_path)  # interrupted: it resumes
    (tmp_path / run.run_dir / "model.pt").write_bytes(b"")
    assert run.done(tmp_path)
    cache = study.STEPS["cache-weak-swap50"]
    pool = tmp_path / "data/bench/pool-swap50"
    pool.mkdir(parents=True)
    for shard in ("00000", "00001"):
        (pool / f"{shard}.tar").write_bytes(b"")
    (pool / "00000.study2-weak.json").write_text("{}")
    (pool / "00001.study2-strong.json").write_text("{}")  # another reference's
    assert not cache.done(tmp_path)
    (pool / "00001.study2-weak.json").write_text("{}")
    assert cache.done(tmp_path)
    keep = study.STEPS["keep-swap50-weak-q20"]
    assert not keep.done(tmp_path)
    (tmp_path / keep.keep_list).mkdir(parents=True)
    (tmp_path / keep.keep_list / "keep.json").write_text("{}")
    assert keep.done(tmp_path)


def fake_run(
    root: Path,
    name: str,
    overrides: list[str],
    finals: float,
    clean: tuple[int, int],
    swapped: tuple[int, int] = (0, 0),
) -> None:
    """results/study2/NAME: the config and two training lines (64 labelled candidates, ``clean`` and
    ``swapped`` of them clean / swapped among the 64 and among the 16 learned) and the evaluation lines:
    primary metric final ``finals``, the average twice that."""
    cfg = apply_overrides(load_recipe(ROOT / "configs/study2.py"), overrides)
    out = root / "results" / "study2" / name
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    lines = [{"step": 0, "eval/average": 0.01, "eval/gallery_r5": 0.05}]
    for step in (20, 40):
        lines.append(
            {
                "step": step,
                "candidates/labelled": 64,
                "candidates/clean": clean[0] / 64,
                "learned/labelled": 16,
                "learned/clean": clean[1] / 16,
                "candidates/noise/swapped": swapped[0] / 64,
                "learned/noise/swapped": swapped[1] / 16,
            }
        )
    lines.append({"step": 40, "eval/average": 2 * finals, "eval/gallery_r5": finals})
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_summary_gives_final_metric_precision_and_lift_per_seed_group(tmp_path, study):
    swap50 = "data=data/bench/pool-swap50"
    fake_run(tmp_path, "iid-swap50-s0", [swap50, "seed=0"], 0.04, (32, 8))
    fake_run(tmp_path, "iid-swap50-s1", [swap50, "seed=1"], 0.05, (32, 8))
    jest = [swap50, "method.method=jest", "reference_cache=study2-weak"]
    fake_run(tmp_path, "jest-f08-swap50-weak-s0", jest, 0.07, (32, 12), swapped=(32, 4))
    # the strong reference differs from an IID run of the natural pool only in its seed: still its own row
    fake_run(tmp_path, "ref-strong", ["data=data/bench/pool", "seed=1000"], 0.06, (16, 4))
    fake_run(tmp_path, "iid-natural-s0", ["data=data/bench/pool", "seed=0"], 0.05, (16, 4))
    rows = {line.split("|")[1].strip(): line for line in study.summary(tmp_path)[2:]}
    assert set(rows) == {"ref-strong", "iid-natural-s0", "iid-swap50", "jest-f08-swap50-weak-s0"}
    assert rows["iid-natural-s0"].split("|")[2].strip() == "1"  # a group of one keeps its name
    cells = [c.strip() for c in rows["iid-swap50"].strip("|").split("|")]
    # final: 4% and 5% -> 4.50 ± sd 0.71 (the average: 9.00 ± 1.41); precision 8/16 = 50%, candidates 50%
    # clean: lift 1
    assert cells == [
        "iid-swap50",
        "2",
        "4.50 ± 0.71",
        "9.00 ± 1.41",
        *["50.0 ± 0.0", "1.000 ± 0.000"] * 2,
        "—",
    ]
    cells = [c.strip() for c in rows["jest-f08-swap50-weak-s0"].strip("|").split("|")]
    # swapped: 4 of 16 learned (32 of 64 offered); none offered to the IID runs: "—"
    assert cells == [
        "jest-f08-swap50-weak-s0",
        "1",
        "7.00",
        "14.00",
        "75.0",
        "1.500",
        "75.0",
        "1.500",
        "25.0",
    ]
    assert study.METRIC == "eval/gallery_r5"  # the pre-registered primary metric (docs/studies/study2.md)


def test_report_commands_compare_each_pools_iid_with_each_references_runs(tmp_path, study):
    fake_run(tmp_path, "iid-swap50-s0", ["seed=0"], 0.04, (32, 8))
    fake_run(
        tmp_path,
        "jest-f08-swap50-weak-s0",
        ["method.method=jest", "reference_cache=study2-weak"],
        0.07,
        (32, 12),
    )
    fake_run(
        tmp_path,
        "drrho-natural-weak-s0",
        ["method.method=drrho", "reference_cache=study2-weak"],
        0.05,
        (32, 8),
    )
    # natural has no IID run yet, swap50 has no strong-reference run: one report
    assert study.report_commands(tmp_path) == [
        [
            "jestclip",
            "report",
            "results/study2/iid-swap50-s0",
            "results/study2/jest-f08-swap50-weak-s0",
            "--metric",
            "eval/gallery_r5",
            "--reference-run",
            "results/study2/ref-weak",
            "--no-diagnostics",
            "--out",
            "results/study2/report-swap50-weak",
        ]
    ]


def test_equal_flops_reads_each_curve_at_the_iid_budget(tmp_path, study):
    """The primary metric at the FLOPs an IID run spends in all, interpolated between evaluations: an IID
    run's final; a run whose steps cost 4x reaches the budget a quarter of the way; one whose evaluations stop
    short of it is 'not reached'."""

    def write(name: str, overrides: list[str], evals: list[tuple[int, float, float]]) -> None:
        cfg = apply_overrides(load_recipe(ROOT / "configs/study2.py"), overrides)
        out = tmp_path / "results" / "study2" / name
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg)))
        lines = [{"step": s, "flops_total": f, "eval/average": m, "eval/gallery_r5": m} for s, f, m in evals]
        (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    swap = "data=data/bench/pool-swap50"
    write("iid-swap50-s0", [swap, "seed=0"], [(0, 0.0, 0.05), (100, 1e12, 0.10)])
    write("iid-swap50-s1", [swap, "seed=1"], [(0, 0.0, 0.05), (100, 1e12, 0.12)])
    jest = [swap, "method.method=jest", "reference_cache=study2-strong"]
    # 4e12 FLOPs over 100 steps: the budget 1e12 falls between the evaluations at steps 20 (0.8e12) and 40
    write(
        "jest-f08-swap50-strong-s0",
        [*jest, "seed=0"],
        [(0, 0.0, 0.05), (20, 0.8e12, 0.10), (40, 1.6e12, 0.20)],
    )
    drrho = [swap, "method.method=drrho", "reference_cache=study2-strong"]
    write("drrho-swap50-strong-s0", drrho, [(0, 0.0, 0.05), (50, 0.5e12, 0.07)])
    lines = study.equal_flops(tmp_path)
    assert lines[0].split("|")[3].strip() == "eval/gallery_r5 (%) at 1e+12 FLOPs"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert rows["iid-swap50"] == ["iid-swap50", "2", "11.00 ± 1.41", "100"]
    # 0.10 + (0.2 / 0.8) x (0.20 - 0.10) = 0.125 at step 20 + 0.25 x 20 = 25
    assert rows["jest-f08-swap50-strong-s0"] == ["jest-f08-swap50-strong-s0", "1", "12.50", "25"]
    assert rows["drrho-swap50-strong-s0"] == ["drrho-swap50-strong-s0", "1", "not reached", "—"]
