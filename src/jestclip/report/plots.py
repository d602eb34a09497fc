"""Figures of a report, written as PNG through matplotlib's object API (no pyplot state, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.colors import CenteredNorm
from matplotlib.figure import Figure

from jestclip.data.quality import CLEAN, SWAPPED
from jestclip.report.diagnostics import SelectionDiagnostics
from jestclip.report.groups import RunGroup, as_group
from jestclip.report.runs import AVERAGE, RunLog
from jestclip.train.composition import CANDIDATES, LEARNED, composition_key

__all__ = ["X_AXES", "accuracy_figure", "plot_accuracy", "plot_composition", "plot_diagnostics"]

X_AXES = (
    ("examples_learned", "examples learned on"),
    ("flops_total", "total FLOPs (train + scoring + reference)"),
)


def plot_accuracy(
    runs: Sequence[RunLog | RunGroup], path: Path, *, target: float | None = None, metric: str = AVERAGE
) -> Path:
    """Figure-1 style: ``metric`` against examples learned on and against total FLOPs, one line per run or
    seed group (its seed mean, with a ±1 standard deviation band across seeds), written to ``path``."""
    accuracy_figure(runs, target=target, metric=metric).savefig(path, dpi=120)
    return path


def accuracy_figure(
    runs: Sequence[RunLog | RunGroup], *, target: float | None = None, metric: str = AVERAGE
) -> Figure:
    """The figure ``plot_accuracy`` writes: two panels, x = ``X_AXES`` (their labels as named there)."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (x, x_label) in zip(axes, X_AXES, strict=True):
        for run in map(as_group, runs):
            xs, mean, std = run.curve(x, metric)
            seeds = f", {len(run.runs)} seeds" if len(run.runs) > 1 else ""
            legend = f"{run.name} ({run.label}{seeds})"
            _band(ax, xs, mean, std, len(run.runs), marker="o", markersize=3, label=legend)
        if target is not None:
            ax.axhline(
                100 * target, color="grey", linestyle="--", linewidth=1, label="target (baseline final)"
            )
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _band(ax, xs: list[float], mean: list[float], std: list[float], seeds: int, **style) -> None:
    """A seed-mean curve in percent, with a ±1 standard deviation band when there are several seeds."""
    line = ax.plot(xs, [100 * y for y in mean], **style)[0]
    if seeds > 1:
        low = [100 * (m - s) for m, s in zip(mean, std, strict=True)]
        high = [100 * (m + s) for m, s in zip(mean, std, strict=True)]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_composition(groups: Sequence[RunGroup], path: Path, *, swapped: bool = False) -> Path:
    """What runs learned on (``report.composition``): the share clean among the examples learned on
    (precision, solid) beside the share among their super-batches' candidates (dashed, same colour), against
    examples learned on, one colour per run or seed group (seed mean, ±1 sd band); with ``swapped`` a second
    panel gives the share of swapped pairs the same way. Each point pools the steps its training line covers.
    """
    panels = [(CLEAN, "share clean (%)")] + ([(SWAPPED, "share swapped (%)")] if swapped else [])
    fig = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for ax, (column, label) in zip(axes, panels, strict=True):
        for group, colour in zip(groups, colours, strict=True):
            seeds = len(group.runs)
            name = f"{group.name} ({group.label}{f', {seeds} seeds' if seeds > 1 else ''})"
            for row, style, what in ((LEARNED, "-", "learned"), (CANDIDATES, "--", "candidates")):
                xs, mean, std = group.curve("examples_learned", composition_key(row, column), training=True)
                _band(ax, xs, mean, std, seeds, color=colour, linestyle=style, label=f"{name}: {what}")
        ax.set_xlabel("examples learned on")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def plot_diagnostics(diag: SelectionDiagnostics, path: Path) -> Path:
    """Figure-2 style: score vs chunks, vs Gibbs steps, vs filter ratio, and the pair-score heat map."""
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    counts = sorted(diag.chunks)
    ax.plot(counts, [diag.chunks[c] for c in counts], marker="o", label="joint (chunked sampler)")
    ax.axhline(diag.uniform, color="grey", linestyle="--", label="uniform (IID)")
    ax.axhline(diag.independent, color="tab:orange", linestyle=":", label="independent")
    ax.axhline(
        diag.gibbs[-1], color="tab:green", linestyle="-.", label=f"Gibbs, {diag.gibbs_steps[-1]} steps"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of chunks")
    ax.set_ylabel(f"sub-batch {diag.scoring}")
    ax.set_title(f"b = {diag.batch_size} of B = {diag.super_batch}")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(diag.gibbs_steps, diag.gibbs, label="Gibbs (brute force)")
    best = max(diag.chunks)
    ax.axhline(diag.chunks[best], color="tab:blue", linestyle="--", label=f"joint, {best} chunks")
    ax.axhline(diag.uniform, color="grey", linestyle="--", label="uniform (IID)")
    ax.set_xlabel("Gibbs iterations")
    ax.set_ylabel(f"sub-batch {diag.scoring}")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ratios = sorted(diag.filter_ratio)
    ax.plot(ratios, [diag.filter_ratio[f] for f in ratios], marker="o")
    ax.set_xlabel("filter ratio f (choose b of b / (1 - f))")
    ax.set_ylabel(f"sub-batch {diag.scoring}")
    ax = axes[1, 1]
    image = ax.imshow(diag.matrix, cmap="RdBu_r", norm=CenteredNorm())  # white = 0
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xlabel("text j")
    ax.set_ylabel("image i")
    ax.set_title(f"pairwise {diag.scoring}, first {len(diag.matrix)} candidates")
    for ax in axes.flat[:3]:
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return path
