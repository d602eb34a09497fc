"""``jestclip report RUN... --out DIR``: curves, speed-up to target, ground-truth composition and selection
diagnostics for runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from jestclip.commands.common import device_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="plots and speed-up-to-target tables comparing runs",
        description="Write a markdown report comparing training runs (trained with eval_data set): average "
        "accuracy against examples and FLOPs, speed-up to the baseline's final accuracy, final per-metric "
        "table, what the runs learned on by ground-truth quality (precision, lift over the candidates, "
        "swapped pairs; for runs whose samples carry a 'quality' entry), and selection diagnostics on one "
        "super-batch of a JEST run.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and its figures")
    parser.add_argument(
        "--baseline", help="run whose final accuracy is the target (default: the first IID run)"
    )
    parser.add_argument(
        "--diagnostics-run",
        type=Path,
        help="run for selection diagnostics (default: the first run that selects)",
    )
    parser.add_argument(
        "--metric",
        help="evaluation key of the curves, finals and speed-ups (default: eval/gallery_r5, the steadier "
        "one, when every run logged it, else eval/average)",
    )
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the selection diagnostics")
    parser.add_argument(
        "--reference-run",
        type=Path,
        help="the reference model's training run: its training and caching FLOPs are shown beside the runs'",
    )
    parser.add_argument(
        "--diagnostics-batch", type=int, default=64, help="sub-batch size b of the diagnostics"
    )
    parser.add_argument("--gibbs-steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu", type=device_arg, help="device of the diagnostics")


def run(args: argparse.Namespace) -> int:
    from jestclip.data.files import check_writable
    from jestclip.report import load_run, reference_cost, run_diagnostics, write_report

    check_writable(args.out, "report directory", "choose another --out")  # before the diagnostics run
    runs = [load_run(path) for path in args.runs]
    reference = None
    if args.reference_run is not None:
        scored = next((r for r in runs if r.description.needs_reference(r.config["method"]["scoring"])), None)
        if scored is None:
            raise ValueError("--reference-run: no run among these scores with a reference")
        reference = reference_cost(args.reference_run, scored.config["data"])
    diagnostics, diagnostics_run = None, None
    if not args.no_diagnostics:
        diagnostics_run = args.diagnostics_run or next((r.path for r in runs if r.description.selects), None)
        if diagnostics_run is None:
            print("report: no non-IID run to take selection diagnostics from; skipping them")
        else:
            diagnostics = run_diagnostics(
                diagnostics_run,
                batch_size=args.diagnostics_batch,
                gibbs_steps=args.gibbs_steps,
                device=args.device,
            )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    settings["runs"] = [str(p) for p in args.runs]
    path = write_report(
        runs,
        args.out,
        baseline=args.baseline,
        diagnostics=diagnostics,
        diagnostics_run=str(diagnostics_run) if diagnostics_run else None,
        reference=reference,
        settings=settings,
        metric=args.metric,
    )
    print(f"report: {path}")
    return 0
