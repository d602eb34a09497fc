"""experiments/gpu_study.py: Study III's compute-matched comparison on a GPU, its whole pipeline in its tiny
CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from experiments import gpu_study
from experiments.study3 import CHOSEN as _CHOSEN
from jestclip.data.quality import quality_entry
from jestclip.data.shards import Pair, png_bytes, shard_name, write_shard

from .eval.test_evaluate import COLOURS, make_suite

ROOT = Path(__file__).resolve().parents[1]
CHOSEN = [_CHOSEN] if _CHOSEN else []  # Study III's chosen selection schedule, run when chosen
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}


def make_bench(root: Path, pairs: int = 96, shard_size: int = 32) -> Path:
    """A benchmark root: a labelled pool of coloured squares (every 4th caption a noisy one; JEST's tiny
    super-batch of 20 needs 40 pairs, its keep list keeps 48) and one eval suite."""
    pool = root / "pool"
    pool.mkdir(parents=True)
    samples = []
    for i in range(pairs):
        colour = COLOURS[i % len(COLOURS)]
        noisy = i % 4 == 3
        text = "gramastar" if noisy else f"a {colour} square"
        quality = quality_entry(None, ["boilerplate_title"]) if noisy else quality_entry(text, [])
        image = png_bytes(Image.new("RGB", (16, 16), RGB[colour]))
        samples.append(Pair(f"p{i:03d}", image, text, {"source": "icons", "quality": quality}))
    shards = []
    for start in range(0, pairs, shard_size):
        shards.append(shard_name(start // shard_size))
        write_shard(pool / shards[-1], samples[start : start + shard_size])
    manifest = {"part": "pool", "count": pairs, "shards": shards, "image_size": 16}
    (pool / "manifest.json").write_text(json.dumps(manifest))
    make_suite(root / "eval", "toy", per_class=25)  # 100 pairs: gallery R@5, the metric, needs a gallery
    return root


def test_steps_resume_and_the_budget_stops_a_step(tmp_path):
    study = gpu_study
    bench = make_bench(tmp_path / "bench")
    plan = study.Plan(study.TINY, bench, tmp_path / "work", tmp_path / "out", "cpu", 2)  # 2 of 3 shards
    names = [name for name, _ in plan.steps()]
    runs = ["iid", "filter-q50", "jest-f08-iidflops", "flexi-jest-f08-iidflops", *CHOSEN]
    assert names == ["corrupt", "ref-strong", "cache", "keep", *runs]
    commands = dict(plan.steps())
    noisy = [str(tmp_path / "work" / "pool-swap50" / f"0000{i}.tar") for i in range(2)]
    assert commands["cache"][2:4] == noisy and "::".join(noisy) in " ".join(commands["jest-f08-iidflops"])
    # scheduled for IID's FLOPs: 8 IID steps buy JEST 3 (8 x 3/8), evaluated at its start, half-way, end
    steps = {
        name: int(next(a for a in commands[name] if a.startswith("steps=")).split("=")[1]) for name in runs
    }
    assert steps["iid"] == steps["filter-q50"] == 8 and steps["jest-f08-iidflops"] == 3
    assert 3 < steps["flexi-jest-f08-iidflops"] < 8
    assert "eval_every=1" in commands["jest-f08-iidflops"] and "eval_every=4" in commands["iid"]
    assert f"keep_list={tmp_path / 'work' / 'keep-q50'}" in commands["filter-q50"]
    assert f"data={bench / 'pool' / '00000.tar'}::{bench / 'pool' / '00001.tar'}" in commands["ref-strong"]
    assert not any(plan.done(name) for name in names)
    (tmp_path / "work" / "iid").mkdir(parents=True)
    (tmp_path / "work" / "iid" / "model.pt").write_bytes(b"")
    assert plan.done("iid")
    whole = study.Plan(study.TINY, bench, tmp_path / "work", tmp_path / "out", "cpu", None)
    assert dict(whole.steps())["cache"][2] == str(tmp_path / "work" / "pool-swap50")  # the directory
    started = study.time.monotonic()  # a step past the deadline is stopped, not waited for
    assert not study.run_step([sys.executable, "-c", "import time; time.sleep(30)"], started + 1)
    assert study.time.monotonic() - started < 20


@pytest.mark.slow
def test_tiny_mode_trains_every_run_and_writes_logs_and_report(tmp_path):
    bench = make_bench(tmp_path / "bench")
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "experiments.gpu_study", "--tiny", "--bench", str(bench)]
    command += ["--out", str(out), "--work", str(work), "--budget", "600"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = ("ref-strong", "iid", "filter-q50", "jest-f08-iidflops", "flexi-jest-f08-iidflops", *CHOSEN)
    for name in runs:
        lines = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((out / "runs" / name / "config.json").read_text())
        assert lines[-1]["step"] == config["steps"] and "eval/average" in lines[-1], name
        assert config["data_in_memory"]
        assert lines[-1]["flops_total"] <= 1.0001 * 8 * iid_step_flops(out), name  # IID's FLOPs, no more
    config = json.loads((out / "runs" / "filter-q50" / "config.json").read_text())
    assert config["keep_list"] == str(work / "keep-q50") and config["data"].endswith("pool-swap50")
    assert (out / "report" / "report.md").exists()
    assert json.loads((out / "report" / "report.json").read_text())["metric"] == "eval/gallery_r5"
    notes = (out / "gpu_study.md").read_text()
    for name in ("ref-strong", "cache", "keep", *runs[1:], "report"):
        assert f"| {name} |" in notes, name
    assert "s / step" in notes and "step time" not in done.stderr
    # a second run finds everything done and only rewrites the report
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    skipped = again.stdout.count("done before, skipped")
    assert again.returncode == 0 and skipped == 3 + len(runs), again.stdout[-2000:]  # + corrupt, cache, keep


def iid_step_flops(out: Path) -> float:
    """One IID step's FLOPs, from the IID run's first training line."""
    lines = [json.loads(x) for x in (out / "runs" / "iid" / "metrics.jsonl").read_text().splitlines()]
    first = next(x for x in lines if "loss" in x)
    return first["flops_total"] / first["step"]


def test_steps_scale_the_schedule_and_too_few_are_refused(tmp_path, monkeypatch, capsys):
    """``--steps N`` (fitting a device budget) evaluates half-way and at the end and checkpoints every N/4;
    fewer than 4 steps is one line naming the value, before anything runs."""
    study = gpu_study
    bench = make_bench(tmp_path / "bench")
    with pytest.raises(SystemExit, match=r"--steps must be >= 4, got 3"):
        study.main(["--tiny", "--bench", str(bench), "--out", str(tmp_path / "o"), "--steps", "3"])
    plans = []
    monkeypatch.setattr(study.Plan, "steps", lambda self: plans.append(self) or [])
    monkeypatch.setattr(study, "run_step", lambda *a: True)
    study.main(
        [
            "--tiny",
            "--bench",
            str(bench),
            "--out",
            str(tmp_path / "o"),
            "--work",
            str(tmp_path / "w"),
            "--steps",
            "40",
        ]
    )
    plan = plans[0]
    assert plan.s.steps == 40
    iid = plan.train("iid", "x", [])
    assert {"steps=40", "eval_every=20", "checkpoint_every=10"} <= set(iid)
