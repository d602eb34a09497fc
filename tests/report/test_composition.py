"""The ground-truth composition tables and figure of a report (report/composition.py), from synthetic run
directories whose training lines carry the composition fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jestclip.data.quality import NOISE_KINDS
from jestclip.report import composition_table, group_seeds, load_run, run_composition, write_report


def composition_line(step: int, learned: tuple[int, int, int], candidates: tuple[int, int, int]) -> dict:
    """A training line at ``step``; ``learned`` / ``candidates``: (labelled, clean, swapped) counts."""
    line = {"step": step, "examples_learned": 10 * step, "flops_total": 1.0 * step, "loss": 1.0}
    for row, (n, clean, swapped) in (("learned", learned), ("candidates", candidates)):
        line[f"{row}/labelled"] = n
        line[f"{row}/clean"] = clean / n
        for kind in NOISE_KINDS:
            line[f"{row}/noise/{kind}"] = swapped / n if kind == "swapped" else 0.0
    return line


def write_run(root: Path, name: str, method: str, seed: int, train: list[dict]) -> Path:
    path = root / name
    path.mkdir(parents=True)
    config = {"method": {"method": method}, "seed": seed, "run_dir": str(path)}
    (path / "config.json").write_text(json.dumps(config))
    evals = [
        {"step": s, "examples_learned": 10 * s, "flops_total": 1.0 * s, "eval/average": a}
        for s, a in ((0, 0.1), (4, 0.3 if method == "iid" else 0.4))
    ]
    lines = sorted(train + evals, key=lambda x: x["step"])
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# JEST seed 0: precision pooled over the run (5 + 6 + 7 + 18) / (10 + 10 + 10 + 20) = 0.72 (the mean of the
# lines' shares would be 0.675); candidates (8 + 8 + 10 + 24) / 100 = 0.5; lift 1.44. Last quarter (step 4,
# after 3/4 of 4 steps): 18 / 20 = 0.9 against 24 / 40 = 0.6, lift 1.5. Swapped: 2 / 50 learned, 14 / 100
# candidates.
JEST_S0 = [
    composition_line(1, (10, 5, 1), (20, 8, 4)),
    composition_line(2, (10, 6, 1), (20, 8, 4)),
    composition_line(3, (10, 7, 0), (20, 10, 2)),
    composition_line(4, (20, 18, 0), (40, 24, 4)),
]
# JEST seed 1: 0.8 against 0.5 every step (lift 1.6), swapped 0 against 0.2.
JEST_S1 = [composition_line(s, (10, 8, 0), (20, 10, 4)) for s in range(1, 5)]
# IID learns on its candidates: 0.5 against 0.5.
IID = [composition_line(s, (10, 5, 2), (10, 5, 2)) for s in range(1, 5)]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [
        write_run(tmp_path, "iid", "iid", 0, IID),
        write_run(tmp_path, "jest-s0", "jest", 0, JEST_S0),
        write_run(tmp_path, "jest-s1", "jest", 1, JEST_S1),
        write_run(tmp_path, "old", "independent", 0, [{"step": s, "loss": 1.0} for s in range(1, 5)]),
    ]


def test_a_runs_composition_pools_its_lines(runs):
    got = run_composition(load_run(runs[1]))
    assert got["precision"] == pytest.approx(0.72) and got["candidates_clean"] == pytest.approx(0.5)
    assert got["lift"] == pytest.approx(1.44)
    assert got["precision_last_quarter"] == pytest.approx(0.9)
    assert got["lift_last_quarter"] == pytest.approx(1.5)
    assert got["learned_swapped"] == pytest.approx(0.04) and got["candidates_swapped"] == pytest.approx(0.14)
    assert got["learned_labelled"] == 50 and got["candidates_labelled"] == 100
    assert got["noise"]["swapped"] == {"learned": pytest.approx(0.04), "candidates": pytest.approx(0.14)}
    assert got["noise"]["near_blank"] == {"learned": 0.0, "candidates": 0.0}
    assert run_composition(load_run(runs[3])) is None


def test_the_table_gives_seed_means_and_leaves_out_runs_without_composition(runs):
    rows = composition_table(group_seeds([load_run(p) for p in runs]))
    assert [(r.run, r.method, r.seeds) for r in rows] == [("iid", "iid", 1), ("jest", "jest", 2)]
    iid, jest = rows
    assert iid.mean["precision"] == pytest.approx(0.5) and iid.mean["lift"] == pytest.approx(1.0)
    assert jest.mean["precision"] == pytest.approx(0.76)
    assert jest.std["precision"] == pytest.approx(0.08 / 2**0.5)
    assert jest.mean["lift"] == pytest.approx(1.52) and jest.mean["lift_last_quarter"] == pytest.approx(1.55)
    assert jest.mean["learned_swapped"] == pytest.approx(0.02)
    assert jest.mean["candidates_swapped"] == pytest.approx(0.17)
    assert jest.noise["swapped"]["candidates"] == pytest.approx(0.17)
    assert composition_table([load_run(runs[3])]) == []


def test_the_report_shows_the_composition_of_labelled_runs(runs, tmp_path):
    out = tmp_path / "report"
    write_report([load_run(p) for p in runs], out)
    text = (out / "report.md").read_text()
    assert "## What the runs learned on (ground truth)" in text
    jest = (
        "| jest | jest | 2 | 45 | 76.00 ± 5.66 | 85.00 ± 7.07 | 50.00 ± 0.00 | 1.52 ± 0.11 | 1.55 ± 0.07 | "
    )
    assert jest + "2.00 ± 2.83 | 17.00 ± 4.24 |" in text
    assert "| iid | iid | 1 | 40 | 50.00 | 50.00 | 50.00 | 1.00 | 1.00 | 20.00 | 20.00 |" in text
    assert "| swapped | 20.00 / 20.00 | 2.00 / 17.00 |" in text and "| near_blank |" not in text
    assert "| old |" not in text.split("## What the runs learned on")[1].split("## Final metrics")[0]
    assert (out / "composition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    by_run = {row["run"]: row for row in data["composition"]}
    assert set(by_run) == {"iid", "jest"} and by_run["jest"]["mean"]["precision"] == pytest.approx(0.76)


def test_a_report_of_runs_without_composition_has_no_such_section(runs, tmp_path):
    out = tmp_path / "report"
    write_report([load_run(runs[3])], out, baseline="old")
    assert "What the runs learned on" not in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["composition"] is None


def test_the_baseline_is_the_first_run_trained_without_curation(tmp_path):
    """A filter, drrho or keep-list run listed before IID is not the IID baseline."""
    from jestclip.report import choose_baseline

    paths = [
        write_run(tmp_path, "filter", "filter", 0, IID),
        write_run(tmp_path, "drrho", "drrho", 0, IID),
        write_run(tmp_path, "iid-kept", "iid", 1, IID),
        write_run(tmp_path, "iid", "iid", 0, IID),
    ]
    kept = json.loads((paths[2] / "config.json").read_text())
    (paths[2] / "config.json").write_text(json.dumps({**kept, "keep_list": "some/keep"}))
    groups = group_seeds([load_run(p) for p in paths])
    assert choose_baseline(groups).name == "iid"
    with pytest.raises(ValueError, match="no IID run"):
        choose_baseline(groups[:3])


def test_the_reference_cost_covers_every_run_that_uses_the_reference(tmp_path):
    """Runs that score with the reference, learn with it (drrho) or train on a keep list it scored (filter, a
    keep-list run of any method) pay its cost; IID and a hard-learner JEST (no reference) do not."""
    from jestclip.report import ReferenceCost

    def run(name: str, method: str, scoring: str = "learnability", **config) -> Path:
        path = write_run(tmp_path, name, method, 0, IID)
        saved = json.loads((path / "config.json").read_text())
        saved["method"]["scoring"] = scoring
        (path / "config.json").write_text(json.dumps({**saved, **config}))
        return path

    paths = [
        run("iid", "iid"),
        run("filter", "filter", keep_list="k"),
        run("drrho", "drrho"),
        run("iid-kept", "iid", keep_list="k", seed=1),
        run("jest", "jest"),
        run("jest-hl", "jest", scoring="hard_learner"),
    ]
    cost = ReferenceCost("ref", train_flops=1.0, cache_flops=2.0, cached_samples=10)
    report = write_report([load_run(p) for p in paths], tmp_path / "out", reference=cost).read_text()
    rows = report.split("## The reference model's own cost")[1].split("\n## ")[0]
    named = {line.split(" | ")[0].lstrip("| ") for line in rows.splitlines() if line.startswith("| ")}
    assert named - {"run", "---"} == {"filter", "drrho", "iid-kept", "jest"}
