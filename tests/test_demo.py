"""``jestclip demo --reduced`` end to end on the real (capped) benchmark, then a re-run that reuses it."""

import json

import pytest

from jestclip.benchmark import SourcePaths, missing_sources
from jestclip.cli import main


@pytest.mark.skipif(
    bool(missing_sources(SourcePaths(), list(SourcePaths().required()))),
    reason="benchmark sources not installed (jestclip data sources --install)",
)
def test_reduced_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    args = ["demo", "--reduced", "--data", str(tmp_path / "bench"), "--out", str(tmp_path / "runs")]
    assert main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'runs' / 'report' / 'report.md'}" in out
    for stage in range(1, 7):
        assert f"[{stage}/6]" in out
    runs = tmp_path / "runs"
    for name in ("reference", "iid", "jest"):
        assert (runs / name / "model.pt").exists(), name
    evals = [json.loads(x) for x in (runs / "jest" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in evals if "eval/average" in x] == [0, 3, 6]
    assert list((tmp_path / "bench" / "pool").glob("*.demo-reference.json"))
    report = (runs / "report" / "report.md").read_text()
    assert "## Speed-up to target" in report and "## Selection diagnostics" in report
    assert report.splitlines()[2].startswith(
        "*The demo shows the pipeline working, not whether JEST pays: one seed"
    )
    # the steadier metric when the runs logged it; the reduced demo's eval suites are under the 100 pairs a
    # gallery needs, so it falls back to the average, and says which
    logged = "eval/gallery_r5" in [x for x in evals if "eval/average" in x][-1]
    assert ("## Gallery R@5" if logged else "## Average accuracy") in report
    assert json.loads((runs / "demo.json").read_text())["build_limit"] == 40

    stamps = {n: (runs / n / "model.pt").stat().st_mtime_ns for n in ("reference", "iid", "jest")}
    assert main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "(build.json says complete)" in out
    assert stamps == {n: (runs / n / "model.pt").stat().st_mtime_ns for n in stamps}
