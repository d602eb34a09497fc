"""``write_report``: the markdown report, its figures and a JSON of every number in it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jestclip.data.quality import NOISE_KINDS
from jestclip.eval.evaluate import GALLERY_SIZE
from jestclip.report.composition import CompositionRow, composition_groups, composition_table
from jestclip.report.diagnostics import SelectionDiagnostics
from jestclip.report.groups import RunGroup, group_seeds
from jestclip.report.plots import plot_accuracy, plot_composition, plot_diagnostics
from jestclip.report.reference import ReferenceCost
from jestclip.report.runs import AVERAGE, RunLog, default_metric
from jestclip.report.speedup import SpeedupRow, speedup_table
from jestclip.train.composition import CANDIDATES, LEARNED

__all__ = ["choose_baseline", "write_report"]


# evaluation key -> (its name in headings, in a sentence, what it is)
METRICS = {
    AVERAGE: (
        "Average accuracy",
        "average accuracy",
        "mean over the eval suites of class-balanced zero-shot and few-shot accuracy and image→text / "
        "text→image R@1",
    ),
    "eval/gallery_r5": (
        "Gallery R@5",
        "gallery R@5",
        f"image→text and text→image R@5 within fixed galleries of {GALLERY_SIZE} pairs, averaged over both "
        "directions and every retrieval suite",
    ),
}


def _names(metric: str) -> tuple[str, str, str]:
    """(heading, in a sentence, meaning) of an evaluation key; a key without an entry is named by itself."""
    name = metric.removeprefix("eval/")
    return METRICS.get(metric, (name, name, f"`{metric}` as the runs logged it"))


def choose_baseline(groups: Sequence[RunGroup], name: str | None = None) -> RunGroup:
    """The group (or run) called ``name``, else the first that trains without curation (IID: its method
    neither selects, nor uses the reference in its loss, nor needs a keep list, and the run has no keep list);
    a ValueError when there is none."""
    if name is not None:
        match = [g for g in groups if name == g.name or any(name in (r.name, str(r.path)) for r in g.runs)]
        if not match:
            raise ValueError(f"baseline {name!r} is not among the runs {[g.name for g in groups]}")
        return match[0]
    iid = [g for g in groups if _uncurated(g)]
    if not iid:
        raise ValueError(
            f"no IID run among {[g.name for g in groups]}; name the baseline run with --baseline"
        )
    return iid[0]


def _uncurated(group: RunGroup) -> bool:
    method = group.description
    curates = method.selects or method.reference_in_loss or method.needs_keep_list
    return not curates and group.config.get("keep_list") is None


def _uses_reference(group: RunGroup) -> bool:
    """Whether the run depends on the reference: for its steps or loss, or through a keep list it scored."""
    method = group.description
    keeps = method.needs_keep_list or group.config.get("keep_list") is not None
    return keeps or method.needs_reference(group.config["method"]["scoring"])


def _num(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def _speedup(cost: float | None, speedup: float | None) -> str:
    if cost is None:
        return "—"
    return "— (reached at start)" if speedup is None else f"{speedup:.2f}×"


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "—"


def _seeds(group: RunGroup) -> str:
    return f"{len(group.runs)} ({', '.join(map(str, group.seeds))})"


def _pm(mean: float, std: float, seeds: int) -> str:
    return _pct(mean) + (f" ± {100 * std:.2f}" if seeds > 1 else "")


def _spread(per_seed: tuple[float | None, ...]) -> str:
    """Per-seed speed-ups as ``min–max`` (and how many seeds never reached the target)."""
    if len(per_seed) < 2:
        return ""
    reached = [v for v in per_seed if v is not None]
    text = f" [{min(reached):.2f}–{max(reached):.2f}]" if reached else ""
    missed = len(per_seed) - len(reached)
    return text + (f" ({missed} of {len(per_seed)} seeds not reached)" if missed else "")


def _runs_section(groups: Sequence[RunGroup], metric: str) -> list[str]:
    lines = [
        "| run | method | model | seeds | steps | examples learned | total FLOPs | "
        f"final {_names(metric)[1]} (%) |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for g in groups:
        final = g.final_eval
        lines.append(
            f"| {g.name} | {g.label} | {g.config.get('model', '?')} | {_seeds(g)} | {final['step']:.0f} | "
            f"{final['examples_learned']:,.0f} | {final['flops_total']:.3g} | "
            f"{_pm(*g.final(metric), len(g.runs))} |"
        )
    dirs = ", ".join(f"`{r.path}`" for g in groups for r in g.runs)
    return [*lines, "", f"Run directories: {dirs}", ""]


def _speedup_section(base: RunGroup, target: float, rows: Sequence[SpeedupRow], metric: str) -> list[str]:
    lines = [
        "## Speed-up to target",
        "",
        f"Target: the final {_names(metric)[1]} of the baseline `{base.name}` ({_pct(target)}%"
        f"{', mean of its seeds' if len(base.runs) > 1 else ''}), reached after its whole run. Cost = "
        "examples learned on (or total FLOPs) at which a run's curve — the seed mean, for several seeds — "
        "first reached the target, interpolated linearly between evaluations; speed-up = baseline cost / "
        "run cost; [min–max] = the same speed-up from each seed's own curve. *Staying above*: the cost from "
        "which the curve stays at or above the target to its end, so an early touch by a noisy curve that "
        "then falls back does not count.",
        "",
        "| run | method | seeds | final (%) | examples to target | speed-up | FLOPs to target | speed-up | "
        "examples, staying above | speed-up | FLOPs speed-up, staying above |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.run} | {row.method} | {row.seeds} | {_pm(row.final, row.final_std, row.seeds)} | "
            f"{_num(row.examples, ',.0f')} | {_speedup(row.examples, row.examples_speedup)}"
            f"{_spread(row.examples_per_seed)} | {_num(row.flops, '.3g')} | "
            f"{_speedup(row.flops, row.flops_speedup)}{_spread(row.flops_per_seed)} | "
            f"{_num(row.examples_lasting, ',.0f')} | "
            f"{_speedup(row.examples_lasting, row.examples_lasting_speedup)} | "
            f"{_speedup(row.flops_lasting, row.flops_lasting_speedup)} |"
        )
    if any(row.seeds == 1 for row in rows):
        lines += [
            "",
            "Rows of one seed are one noisy curve each: their speed-ups are not evidence until seeds agree "
            "(compare with how much the baseline's own seeds differ).",
        ]
    return lines


def _reference_section(groups: Sequence[RunGroup], reference: ReferenceCost) -> list[str]:
    lines = [
        "",
        "## The reference model's own cost",
        "",
        f"Reference `{reference.run}`: training {reference.train_flops:.3g} FLOPs; caching its embeddings of "
        f"{reference.cached_samples:,} pairs {reference.cache_flops:.3g} FLOPs; together "
        f"{reference.total:.3g}. Paid once and shared by every run that uses it (to score, in its loss, or "
        "through a keep list it scored); the curves and the speed-ups above count per-step FLOPs only "
        "(appendix A.4).",
        "",
        "| run | total FLOPs (per-step) | with the reference's cost | reference share |",
        "|---|---|---|---|",
    ]
    for g in groups:
        if _uses_reference(g):
            own = g.final_eval["flops_total"]
            lines.append(
                f"| {g.name} | {own:.3g} | {own + reference.total:.3g} | "
                f"{reference.total / (own + reference.total):.1%} |"
            )
    return lines


def _curves_section(groups: Sequence[RunGroup], metric: str = AVERAGE) -> list[str]:
    """``metric`` at every evaluation step, seed mean (± sd across seeds), one row per run or group."""
    curves: dict[str, dict[int, tuple[float, float]]] = {}
    for g in groups:
        xs, mean, std = g.curve("step", metric)
        curves[g.name] = {int(x): (m, sd) for x, m, sd in zip(xs, mean, std, strict=True)}
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = [
        f"## {_names(metric)[0]} at each evaluation (%, seed mean ± sd)",
        "",
        "| run | " + " | ".join(f"{step:,}" for step in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for g in groups:
        cells = []
        for step in steps:
            mean, std = curves[g.name].get(step, (None, None))
            cells.append("" if mean is None else _pm(mean, std, len(g.runs)))
        lines.append(f"| {g.name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _metrics_section(groups: Sequence[RunGroup]) -> list[str]:
    """The final value of every run-level metric and each suite's average (every per-task number is in
    report.json)."""
    keys = {k for g in groups for k in g.final_eval if k.startswith("eval/")}
    overall = sorted(k for k in keys if k.count("/") == 1)
    suites = sorted(k for k in keys if k.count("/") == 2 and k.endswith("/average"))
    lines = [
        "",
        "## Final metrics (%, seed mean)",
        "",
        "Run-level metrics, then each eval suite's average; definitions in docs/eval.md, every per-suite and "
        "per-task number in report.json (`final`).",
        "",
        "| metric | " + " | ".join(g.name for g in groups) + " |",
    ]
    lines += ["|---|" + "---|" * len(groups)]
    for metric in overall + suites:
        cells = [_pct(g.final_eval.get(metric)) for g in groups]
        lines.append(f"| {metric.removeprefix('eval/')} | " + " | ".join(cells) + " |")
    return lines


def _value(row: CompositionRow, key: str, *, percent: bool = True) -> str:
    """A composition number: seed mean (± sd for several seeds), in % or as a ratio; — when unknown."""
    mean, std = row.mean.get(key), row.std.get(key)
    if mean is None:
        return "—"
    scale = 100 if percent else 1
    return f"{scale * mean:.2f}" + (f" ± {scale * std:.2f}" if row.seeds > 1 else "")


def _composition_section(rows: Sequence[CompositionRow], swapped: bool) -> list[str]:
    head = "| run | method | seeds | labelled learned on | precision (%) | last quarter (%) | "
    head += "candidates clean (%) | lift | lift, last quarter |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if swapped:
        head, rule = head + " swapped learned (%) | swapped candidates (%) |", rule + "---|---|"
    lines = [
        "",
        "## What the runs learned on (ground truth)",
        "",
        "![share clean among learned and among candidates](composition.png)",
        "",
        "From the samples whose JSON carries `quality` (labelled by the benchmark builder). Precision = "
        "share clean among the labelled examples learned on; candidates clean = the same share among the "
        "super-batches' candidates; lift = precision / candidates clean (1 for IID, which learns on its "
        "candidates). Shares pool every training line of a run (*last quarter*: the lines after 3/4 of "
        "its steps); seed mean ± sd. In the figure each point covers the steps since the previous line.",
        "",
        head,
        rule,
    ]
    for row in rows:
        cells = [
            f"{row.mean['learned_labelled']:,.0f}",
            _value(row, "precision"),
            _value(row, "precision_last_quarter"),
            _value(row, "candidates_clean"),
            _value(row, "lift", percent=False),
            _value(row, "lift_last_quarter", percent=False),
        ]
        if swapped:
            cells += [_value(row, "learned_swapped"), _value(row, "candidates_swapped")]
        lines.append(f"| {row.run} | {row.method} | {row.seeds} | " + " | ".join(cells) + " |")
    kinds = [k for k in NOISE_KINDS if any(r.noise[k][CANDIDATES] for r in rows)]
    if kinds:
        lines += [
            "",
            "Noise kinds, share among learned / among candidates (%, over the run, seed mean):",
            "",
            "| noise kind | " + " | ".join(r.run for r in rows) + " |",
            "|---|" + "---|" * len(rows),
        ]
        for kind in kinds:
            cells = [f"{_pct(r.noise[kind][LEARNED])} / {_pct(r.noise[kind][CANDIDATES])}" for r in rows]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def _diagnostics_section(d: SelectionDiagnostics, run: str | None) -> list[str]:
    best = max(d.chunks)
    return [
        "",
        "## Selection diagnostics",
        "",
        f"One super-batch of B = {d.super_batch} from `{run}`: its final learner and its "
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


def write_report(
    runs: Sequence[RunLog],
    out: str | Path,
    *,
    baseline: str | None = None,
    diagnostics: SelectionDiagnostics | None = None,
    diagnostics_run: str | None = None,
    reference: ReferenceCost | None = None,
    settings: dict[str, Any] | None = None,
    metric: str | None = None,
    caveat: str | None = None,
) -> Path:
    """Write ``report.md``, ``accuracy.png``, ``diagnostics.png`` (if given), ``composition.png`` (when runs
    logged the ground-truth composition of what they learned on: ``report.composition``) and ``report.json``
    into ``out``.

    Runs whose configs differ only in seed are reported as one group (seed-mean curve with a band, mean ± std
    finals, speed-up on the mean curve with its per-seed range). Every run needs evaluation lines; group
    names must be distinct (they label the curves and columns). ``metric``: the evaluation key the curves,
    finals and speed-ups use (default: ``runs.default_metric``, the steadier gallery R@5 when every run
    logged it, else ``eval/average``); a ValueError names a key that the runs' final evaluations lack.
    ``caveat``: one line under the title saying what the runs can and cannot show.
    """
    if not runs:
        raise ValueError("no runs to report")
    metric = metric or default_metric(runs)
    for run in runs:
        run.final_eval  # noqa: B018 - raises a clear error for a run without evaluations
    missing = [str(r.path) for r in runs if metric not in r.final_eval]
    if missing:
        raise ValueError(f"metric {metric!r} is not in the final evaluation of run(s) {missing}")
    groups = group_seeds(runs)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"run names repeat: {names}; give runs distinct directory names")
    base = choose_baseline(groups, baseline)
    target, rows = speedup_table(groups, base, metric)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(groups, out / "accuracy.png", target=target, metric=metric)
    lines = [
        "# jestclip report",
        "",
        *([f"*{caveat}*", ""] if caveat else []),
        *_runs_section(groups, metric),
    ]
    name, in_sentence, meaning = _names(metric)
    lines += [f"## {name}", "", f"![{in_sentence} vs examples and FLOPs](accuracy.png)", ""]
    lines += [
        f"{name} = {meaning} (docs/eval.md). Bands: ±1 standard deviation across seeds.",
        "",
        *_curves_section(groups, metric),
        *_speedup_section(base, target, rows, metric),
    ]
    if reference is not None:
        lines += _reference_section(groups, reference)
    composition = composition_table(groups)
    if composition:
        swapped = any(row.mean["candidates_swapped"] for row in composition)
        plot_composition(composition_groups(groups), out / "composition.png", swapped=swapped)
        lines += _composition_section(composition, swapped)
    lines += _metrics_section(groups)
    if diagnostics is not None:
        plot_diagnostics(diagnostics, out / "diagnostics.png")
        lines += _diagnostics_section(diagnostics, diagnostics_run)
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = {
        "settings": settings or {},
        "baseline": base.name,
        "metric": metric,
        "target": target,
        "groups": {g.name: [str(r.path) for r in g.runs] for g in groups},
        "speedup": [asdict(r) for r in rows],
        "final": {g.name: g.final_eval for g in groups},
        "reference": asdict(reference) if reference is not None else None,
        "composition": [asdict(row) for row in composition] or None,
        "diagnostics": asdict(diagnostics) if diagnostics is not None else None,
    }
    (out / "report.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return out / "report.md"
