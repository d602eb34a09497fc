"""``write_report``: the markdown report, its figures and a JSON of every number in it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jestclip.report.diagnostics import SelectionDiagnostics
from jestclip.report.plots import plot_accuracy, plot_diagnostics
from jestclip.report.runs import AVERAGE, RunLog
from jestclip.report.speedup import speedup_table

__all__ = ["choose_baseline", "write_report"]


def choose_baseline(runs: Sequence[RunLog], name: str | None = None) -> RunLog:
    """The run called ``name``, else the first run whose method does not select (IID); a ValueError when
    there is none."""
    if name is not None:
        match = [r for r in runs if r.name == name or str(r.path) == name]
        if not match:
            raise ValueError(f"baseline {name!r} is not among the runs {[r.name for r in runs]}")
        return match[0]
    iid = [r for r in runs if not r.description.selects]
    if not iid:
        raise ValueError(f"no IID run among {[r.name for r in runs]}; name the baseline run with --baseline")
    return iid[0]


def _num(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def _speedup(cost: float | None, speedup: float | None) -> str:
    if cost is None:
        return "—"
    return "— (reached at start)" if speedup is None else f"{speedup:.2f}×"


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "—"


def write_report(
    runs: Sequence[RunLog],
    out: str | Path,
    *,
    baseline: str | None = None,
    diagnostics: SelectionDiagnostics | None = None,
    diagnostics_run: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.md``, ``accuracy.png``, ``diagnostics.png`` (if given) and ``report.json`` into ``out``.

    Every run needs evaluation lines; names must be distinct (they label the curves and columns).
    """
    if not runs:
        raise ValueError("no runs to report")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names repeat: {names}; give runs distinct directory names")
    for run in runs:
        run.final_eval  # noqa: B018 - raises a clear error for a run without evaluations
    base = choose_baseline(runs, baseline)
    target, rows = speedup_table(runs, base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(runs, out / "accuracy.png", target=target)

    lines = ["# jestclip report", ""]
    lines += ["| run | method | model | steps | examples learned | total FLOPs | final average (%) |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for run in runs:
        final = run.final_eval
        lines.append(
            f"| {run.name} | {run.method} | {run.config.get('model', '?')} | {final['step']} | "
            f"{final['examples_learned']:,} | {final['flops_total']:.3g} | {_pct(final[AVERAGE])} |"
        )
    lines += ["", "Run directories: " + ", ".join(f"`{r.path}`" for r in runs), ""]
    lines += ["## Average accuracy", "", "![average accuracy vs examples and FLOPs](accuracy.png)", ""]
    lines += [
        "Average accuracy = mean over the eval suites of zero-shot and few-shot top-1 and image→text / "
        "text→image R@1.",
        "",
        "## Speed-up to target",
        "",
        f"Target: the final average accuracy of the baseline `{base.name}` ({_pct(target)}%), reached after "
        "its whole run. Cost = examples learned on (or total FLOPs) at which a run first reached the target, "
        "interpolated linearly between evaluations; speed-up = baseline cost / run cost. Each curve is "
        "one run (one seed): at small scale, evaluation noise of a point or so moves these numbers a lot.",
        "",
        "| run | method | final (%) | examples to target | speed-up | FLOPs to target | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.run} | {row.method} | {_pct(row.final)} | {_num(row.examples, ',.0f')} | "
            f"{_speedup(row.examples, row.examples_speedup)} | {_num(row.flops, '.3g')} | "
            f"{_speedup(row.flops, row.flops_speedup)} |"
        )
    metrics = sorted({k for r in runs for k in r.final_eval if k.startswith("eval/")})
    lines += ["", "## Final metrics (%)", "", "| metric | " + " | ".join(names) + " |"]
    lines += ["|---|" + "---|" * len(runs)]
    for metric in metrics:
        cells = [_pct(r.final_eval.get(metric)) for r in runs]
        lines.append(f"| {metric.removeprefix('eval/')} | " + " | ".join(cells) + " |")

    if diagnostics is not None:
        plot_diagnostics(diagnostics, out / "diagnostics.png")
        d = diagnostics
        best = max(d.chunks)
        lines += [
            "",
            "## Selection diagnostics",
            "",
            f"One super-batch of B = {d.super_batch} from `{diagnostics_run}`: its final learner and its "
            f"cached reference embeddings, {d.scoring} scoring, {d.loss} loss, gain {d.gain:g}; sub-batches "
            f"of b = {d.batch_size}, scores averaged over {d.seeds} seeds.",
            "",
            "![selection diagnostics](diagnostics.png)",
            "",
            "| selection | sub-batch score |",
            "|---|---|",
            f"| uniform (IID) | {d.uniform:.4f} |",
            f"| independent | {d.independent:.4f} |",
            *(f"| joint, {c} chunk{'s' if c > 1 else ''} | {d.chunks[c]:.4f} |" for c in sorted(d.chunks)),
            f"| Gibbs, {d.gibbs_steps[-1]} steps | {d.gibbs[-1]:.4f} |",
            "",
            f"Joint selection with {best} chunks gains {d.chunks[best] - d.uniform:+.4f} over uniform and "
            f"{d.chunks[best] - d.independent:+.4f} over independent selection.",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = {
        "settings": settings or {},
        "baseline": base.name,
        "target": target,
        "speedup": [asdict(r) for r in rows],
        "final": {r.name: r.final_eval for r in runs},
        "diagnostics": asdict(diagnostics) if diagnostics is not None else None,
    }
    (out / "report.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return out / "report.md"
