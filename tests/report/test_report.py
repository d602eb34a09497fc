"""Speed-up interpolation on synthetic curves; run logs; a report written from two small real runs."""

import json
from pathlib import Path

import pytest

from jestclip.report import RunLog, first_crossing, lasting_crossing, load_run, speedup_table


def test_first_crossing_interpolates_between_evaluations():
    xs, ys = [0, 100, 200, 300], [0.1, 0.3, 0.5, 0.4]
    assert first_crossing(xs, ys, 0.4) == pytest.approx(150.0)
    assert first_crossing(xs, ys, 0.5) == 200.0
    assert first_crossing(xs, ys, 0.05) == 0.0  # reached before training
    assert first_crossing(xs, ys, 0.51) is None
    assert first_crossing(xs, [0.1, 0.5, 0.2, 0.6], 0.45) == pytest.approx(87.5)  # the first crossing counts
    with pytest.raises(ValueError, match="must not decrease"):
        first_crossing([0, 2, 1], [0, 1, 2], 0.5)
    with pytest.raises(ValueError, match="3 x values for 2 y values"):
        first_crossing([0, 1, 2], [0, 1], 0.5)


def test_lasting_crossing_ignores_a_touch_the_curve_falls_back_from():
    xs = [0, 100, 200, 300, 400]
    assert lasting_crossing(xs, [0.1, 0.5, 0.2, 0.6, 0.7], 0.4) == pytest.approx(250.0)  # not 75
    assert first_crossing(xs, [0.1, 0.5, 0.2, 0.6, 0.7], 0.4) == pytest.approx(75.0)
    assert lasting_crossing(xs, [0.1, 0.2, 0.3, 0.4, 0.5], 0.4) == 300.0  # equal counts as reached
    assert lasting_crossing(xs, [0.5, 0.6, 0.5, 0.6, 0.7], 0.4) == 0.0
    assert lasting_crossing(xs, [0.1, 0.5, 0.6, 0.7, 0.3], 0.4) is None  # ends below
    with pytest.raises(ValueError, match="must not decrease"):
        lasting_crossing([0, 2, 1], [0, 1, 2], 0.5)


def synthetic_run(name: str, method: str, accuracy: list[float], per_step: float, step: int = 10) -> RunLog:
    evals = [
        {
            "step": i * step,
            "examples_learned": i * step * 10,
            "flops_total": i * step * per_step,
            "eval/average": a,
        }
        for i, a in enumerate(accuracy)
    ]
    return RunLog(name, Path(name), {"method": {"method": method}}, [], evals)


def test_speedup_to_target_on_synthetic_curves():
    iid = synthetic_run("iid", "iid", [0.0, 0.2, 0.4, 0.5, 0.6], per_step=1.0)
    # JEST climbs twice as fast per example but each step costs 3x the FLOPs
    jest = synthetic_run("jest", "jest", [0.0, 0.4, 0.6, 0.7, 0.75], per_step=3.0)
    flat = synthetic_run("flat", "jest", [0.0, 0.1, 0.2, 0.3, 0.3], per_step=1.0)
    target, rows = speedup_table([iid, jest, flat], iid)
    assert target == 0.6
    by = {r.run: r for r in rows}
    assert by["iid"].examples == pytest.approx(400) and by["iid"].examples_speedup == pytest.approx(1.0)
    assert by["jest"].examples == pytest.approx(200) and by["jest"].examples_speedup == pytest.approx(2.0)
    assert by["jest"].flops == pytest.approx(60) and by["jest"].flops_speedup == pytest.approx(40 / 60)
    assert by["flat"].examples is None and by["flat"].examples_speedup is None
    # a noisy baseline that touched its final value early still costs its whole run
    bumpy = synthetic_run("bumpy", "iid", [0.0, 0.5, 0.3, 0.4], per_step=1.0)
    target, rows = speedup_table([bumpy, jest], bumpy)
    assert target == 0.4 and rows[0].examples == 300 and rows[0].examples_speedup == 1.0
    assert rows[1].examples == pytest.approx(100) and rows[1].examples_speedup == pytest.approx(3.0)
    # staying above: the bumpy baseline costs its run; a run that dips below after touching is charged later
    dip = synthetic_run("dip", "jest", [0.0, 0.5, 0.3, 0.45, 0.5], per_step=1.0)
    _, rows = speedup_table([bumpy, dip], bumpy)
    assert rows[0].examples_lasting == 300 and rows[0].examples_lasting_speedup == 1.0
    assert rows[1].examples == pytest.approx(80) and rows[1].examples_speedup == pytest.approx(300 / 80)
    assert rows[1].examples_lasting == pytest.approx(267, abs=1) and rows[1].flops_lasting == pytest.approx(
        26.7, abs=0.1
    )
    assert rows[1].examples_lasting_speedup == pytest.approx(300 / (200 + 100 * 0.1 / 0.15))


def test_load_run_keeps_the_last_line_of_a_step_and_names_bad_lines(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": {"method": "jest"}}))
    lines = [
        {"step": 0, "examples_learned": 0, "eval/average": 0.1},
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "examples_learned": 8, "eval/average": 0.2},
        {"step": 2, "loss": 1.5},  # resumed: step 2 logged again
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    run = load_run(tmp_path)
    assert [r["step"] for r in run.train] == [1, 2] and run.train[-1]["loss"] == 1.5
    assert run.curve("examples_learned") == ([0.0, 8.0], [0.1, 0.2])
    assert run.method == "jest"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON line"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        load_run(tmp_path / "nothing")
    empty = RunLog("e", tmp_path, {}, [], [])
    with pytest.raises(ValueError, match="has no evaluation lines"):
        empty.final_eval  # noqa: B018


def seeded(name: str, method: str, seed: int, accuracy: list[float], per_step: float = 1.0) -> RunLog:
    run = synthetic_run(name, method, accuracy, per_step)
    return RunLog(
        name, Path(name), {"method": {"method": method}, "seed": seed, "run_dir": name}, [], run.evals
    )


def test_runs_that_differ_only_in_seed_are_one_group_with_a_band():
    from jestclip.report import group_seeds

    iid = [seeded(f"iid-s{s}", "iid", s, [0.0, 0.2 + d, 0.4 + d, 0.6 + d]) for s, d in enumerate((0.0, 0.02))]
    jest = [seeded(f"jest-s{s}", "jest", s, [0.0, 0.5 + d, 0.6 + d, 0.7]) for s, d in enumerate((0.1, -0.1))]
    other = seeded("jest-f09", "jest", 0, [0.0, 0.1, 0.2, 0.3])
    other = RunLog(other.name, other.path, {**other.config, "filter_ratio": 0.9}, [], other.evals)
    groups = group_seeds([*iid, *jest, other])
    assert [(g.name, len(g.runs)) for g in groups] == [("iid", 2), ("jest", 2), ("jest-f09", 1)]
    xs, mean, std = groups[1].curve("examples_learned")
    assert xs == [0, 100, 200, 300] and mean == pytest.approx([0.0, 0.5, 0.6, 0.7])
    assert std[1] == pytest.approx(0.1414, abs=1e-4) and std[3] == 0.0
    assert groups[0].final() == pytest.approx((0.61, 0.01414), abs=1e-4)

    target, rows = speedup_table(groups, groups[0])
    assert target == pytest.approx(0.61)
    by = {r.run: r for r in rows}
    # the seed-mean JEST curve (0.5, 0.6, 0.7 at 100, 200, 300 examples) crosses 0.61 at 210 examples
    assert by["jest"].examples == pytest.approx(210) and by["jest"].examples_speedup == pytest.approx(
        300 / 210
    )
    # seed 0 (0.6, 0.7, 0.7) crosses at 110; seed 1 (0.4, 0.5, 0.7) at 255
    assert by["jest"].examples_per_seed == pytest.approx((300 / 110, 300 / 255))
    assert by["iid"].examples_per_seed == (1.0, 1.0) and by["jest"].seeds == 2
    assert by["jest-f09"].examples is None

    same_seed = seeded("iid-again", "iid", 0, [0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="have the same config and seed"):
        group_seeds([iid[0], same_seed])

    # a run written before a config key existed groups with runs that leave the key at its default
    seed1 = iid[1]
    newer = [
        RunLog(seed1.name, seed1.path, {**seed1.config, "draft_decode": d}, [], seed1.evals) for d in (0, 1)
    ]
    assert [len(g.runs) for g in group_seeds([iid[0], newer[0]])] == [2]
    assert [len(g.runs) for g in group_seeds([iid[0], newer[1]])] == [1, 1]


def test_the_curves_table_has_a_column_per_evaluation_and_a_band_for_seed_groups():
    from jestclip.report import group_seeds
    from jestclip.report.write import _curves_section

    iid = [seeded(f"iid-s{s}", "iid", s, [0.0, 0.2 + d, 0.4 + d]) for s, d in enumerate((0.0, 0.02))]
    longer = seeded("jest", "jest", 0, [0.0, 0.3, 0.5, 0.6])
    lines = _curves_section(group_seeds([*iid, longer]))
    assert lines[2] == "| run | 0 | 10 | 20 | 30 |"
    assert lines[4] == "| iid | 0.00 ± 0.00 | 21.00 ± 1.41 | 41.00 ± 1.41 |  |"
    assert lines[5] == "| jest | 0.00 | 30.00 | 50.00 | 60.00 |"
