"""Reports comparing runs: accuracy curves against examples and FLOPs, speed-up to target, selection
diagnostics (the paper's figures 1 and 2 and its per-task tables).
"""

from jestclip.report.diagnostics import (
    SelectionDiagnostics,
    run_diagnostics,
    run_embeddings,
    selection_diagnostics,
)
from jestclip.report.plots import plot_accuracy, plot_diagnostics
from jestclip.report.runs import AVERAGE, RunLog, load_run
from jestclip.report.speedup import SpeedupRow, first_crossing, speedup_table
from jestclip.report.write import choose_baseline, write_report

__all__ = [
    "AVERAGE",
    "RunLog",
    "SelectionDiagnostics",
    "SpeedupRow",
    "choose_baseline",
    "first_crossing",
    "load_run",
    "plot_accuracy",
    "plot_diagnostics",
    "run_diagnostics",
    "run_embeddings",
    "selection_diagnostics",
    "speedup_table",
    "write_report",
]
