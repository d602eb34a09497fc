"""Smoke test of benchmarks/pool.py in its tiny CPU mode: both data modes train and are timed."""

from __future__ import annotations

from .test_benchmarks import number, run_script, table_rows


def test_pool_script_quick_times_streamed_and_in_memory_runs():
    done = run_script("pool.py", "--quick", "--methods", "jest")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Before the runs, pool: 96 samples from 4 shards in memory (" in out
    rows = table_rows(out, "1")
    assert [(r[1], r[2]) for r in rows] == [("JEST f = 0.8", "streamed"), ("JEST f = 0.8", "in memory")]
    assert all(number(r[3]) > 0 for r in rows)
    (summary,) = table_rows(out, "JEST")
    assert summary[3].endswith("x")
