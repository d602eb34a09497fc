"""A report written by ``jestclip report`` from two small real runs (IID and JEST) with periodic eval."""

import dataclasses
import json
from pathlib import Path

import pytest

from jestclip.cli import main
from jestclip.train.loop import train

from ..eval.test_evaluate import make_suite
from ..train.test_loop import cached_shards, config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    shards = cached_shards(root / "shards", 2, 12)
    make_suite(root / "bench" / "eval", "toy", per_class=25)  # 100 pairs: the gallery metrics are measured
    out = []
    for method in ("iid", "jest"):
        cfg = config(root / method, shards, method, steps=4, eval_data=str(root / "bench"))
        train(dataclasses.replace(cfg, eval_every=2), progress=False)
        out.append(Path(cfg.run_dir))
    return out[0], out[1]


def test_report_writes_markdown_figures_and_numbers(runs, tmp_path, capsys):
    iid, jest = runs
    out = tmp_path / "report"
    args = [
        "report",
        str(iid),
        str(jest),
        "--out",
        str(out),
        "--diagnostics-batch",
        "2",
        "--gibbs-steps",
        "20",
    ]
    assert main(args) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    for name in ("report.md", "accuracy.png", "diagnostics.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    for heading in (
        "## Gallery R@5",  # the steadier metric, by default, when every run logged it
        "## Gallery R@5 at each evaluation",
        "## Speed-up to target",
        "## Final metrics",
        "## Selection diagnostics",
    ):
        assert heading in text
    assert "| gallery_r5 |" in text and "| toy/average |" in text  # run-level, then each suite's average
    assert "| toy/zeroshot:colour |" not in text  # per-task numbers: report.json
    assert "What the runs learned on" not in text and not (out / "composition.png").exists()  # no labels
    data = json.loads((out / "report.json").read_text())
    assert data["baseline"] == "iid" and [r["run"] for r in data["speedup"]] == ["iid", "jest"]
    diag = data["diagnostics"]
    # at the run's own f = 0.5: B = b / (1 - f) = 4 of the diagnostics' b = 2
    assert diag["super_batch"] == 4 and set(diag["filter_ratio"]) == {"0.0", "0.5"}
    assert len(diag["gibbs"]) == 21 and len(diag["matrix"]) == 4
    assert data["settings"]["runs"] == [str(iid), str(jest)]
    assert data["composition"] is None and data["metric"] == "eval/gallery_r5"
    assert "toy/zeroshot:colour" in json.dumps(data["final"])


def test_the_accuracy_figure_labels_its_axes_as_they_say(runs):
    from jestclip.report import group_seeds, load_run
    from jestclip.report.plots import accuracy_figure

    groups = group_seeds([load_run(path) for path in runs])
    figure = accuracy_figure(groups, target=0.1, metric="eval/gallery_r5")
    examples, flops = figure.axes[:2]
    assert examples.get_xlabel() == "examples learned on"
    assert flops.get_xlabel() == "total FLOPs (train + scoring + reference)"
    assert examples.get_ylabel() == flops.get_ylabel() == "eval/gallery_r5 (%)"
    assert [t.get_text() for t in examples.get_legend().get_texts()][:2] == ["iid (iid)", "jest (jest)"]


def test_report_takes_the_metric_it_compares_on(runs, tmp_path, capsys):
    iid, jest = runs
    out = tmp_path / "r5"
    assert (
        main(
            [
                "report",
                str(iid),
                str(jest),
                "--out",
                str(out),
                "--no-diagnostics",
                "--metric",
                "eval/gallery_r5",
            ]
        )
        == 0
    )
    text = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    final = json.loads((iid / "metrics.jsonl").read_text().splitlines()[-1])
    assert data["metric"] == "eval/gallery_r5" and data["target"] == final["eval/gallery_r5"]
    assert "## Gallery R@5 at each evaluation" in text and "final gallery R@5 (%)" in text
    assert "## Average accuracy" not in text
    assert main(["report", str(iid), "--out", str(out), "--no-diagnostics", "--metric", "eval/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jestclip report: metric 'eval/nope' is not in the final evaluation of run(s) ['{iid}']"


def test_report_errors(runs, tmp_path, capsys):
    iid, jest = runs
    for args, message in [
        ([str(jest), "--no-diagnostics"], "no IID run among"),
        ([str(iid), "--baseline", "x", "--no-diagnostics"], "baseline 'x' is not among"),
        ([str(tmp_path)], "is not a training run"),
    ]:
        assert main(["report", *args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jestclip report: ") and message in err and "\n" not in err


def test_report_shows_the_reference_models_own_cost(runs, tmp_path):
    from jestclip.models import create_model, forward_flops
    from jestclip.report import count_samples, load_run, reference_cost, write_report

    iid, jest = runs
    data = load_run(jest).config["data"]
    assert count_samples(data) == 24  # 2 shards of 12
    cost = reference_cost(iid, data)  # the IID run stands in for a reference trained with jestclip train
    assert cost.train_flops == load_run(iid).final_eval["flops_total"] > 0
    assert (
        cost.cache_flops
        == forward_flops(create_model("jest-micro"), image_size=32, context_length=16).total * 24
    )
    report = write_report([load_run(iid), load_run(jest)], tmp_path / "r", reference=cost).read_text()
    assert "## The reference model's own cost" in report
    assert f"| {jest.name} | " in report.split("## The reference model's own cost")[1]


def test_report_command_takes_the_reference_run(runs, tmp_path):
    iid, jest = runs
    assert (
        main(
            [
                "report",
                str(iid),
                str(jest),
                "--out",
                str(tmp_path),
                "--no-diagnostics",
                "--reference-run",
                str(iid),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["reference"]["run"] == iid.name and data["reference"]["cached_samples"] == 24


def test_reference_cost_works_in_a_fresh_process(runs):
    """reference_cost registers jestclip's model configs itself: it once asked open_clip for 'jest-micro'
    before anything had registered it, which worked only after a model had been built in the process."""
    import os
    import subprocess
    import sys

    iid, _ = runs
    shards = iid.parent / "shards"
    code = f"from jestclip.report import reference_cost; print(reference_cost({str(iid)!r}, {str(shards)!r}))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cached_samples=24" in out.stdout
