"""Reports comparing runs: accuracy curves against examples and FLOPs, speed-up to target, selection
diagnostics (the paper's figures 1 and 2 and its per-task tables), and, for runs on labelled data, the
ground-truth composition of what they learned on.
"""

from jestclip.report.composition import CompositionRow, composition_table, run_composition
from jestclip.report.diagnostics import (
    SelectionDiagnostics,
    run_diagnostics,
    run_embeddings,
    selection_diagnostics,
)
from jestclip.report.groups import RunGroup, group_seeds
from jestclip.report.plots import plot_accuracy, plot_composition, plot_diagnostics
from jestclip.report.reference import ReferenceCost, count_samples, reference_cost
from jestclip.report.runs import AVERAGE, RunLog, load_run
from jestclip.report.speedup import SpeedupRow, first_crossing, lasting_crossing, speedup_table
from jestclip.report.write import choose_baseline, write_report

__all__ = [
    "AVERAGE",
    "CompositionRow",
    "ReferenceCost",
    "RunGroup",
    "RunLog",
    "SelectionDiagnostics",
    "SpeedupRow",
    "choose_baseline",
    "composition_table",
    "count_samples",
    "first_crossing",
    "group_seeds",
    "lasting_crossing",
    "load_run",
    "plot_accuracy",
    "plot_composition",
    "plot_diagnostics",
    "reference_cost",
    "run_composition",
    "run_diagnostics",
    "run_embeddings",
    "selection_diagnostics",
    "speedup_table",
    "write_report",
]
