"""What runs learned on, by ground-truth quality: the selection's precision, its lift over the candidates
and the swapped pairs it let through, from the composition fields of the training lines
(``train.composition``; logged when the samples carry a ``quality`` entry).

Every number pools the labelled samples of the lines it covers (each line gives shares and the labelled
count they are of, so the counts are recovered exactly): precision = clean examples learned on / labelled
examples learned on; the candidates' share clean likewise over the super-batches; lift = precision / the
candidates' share clean (1 for IID, which learns on its candidates). *Last quarter*: the lines logged after
3/4 of the run's last logged step. A seed group's value is the mean over its seeds (± standard deviation).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jestclip.data.quality import CLEAN, NOISE_KINDS, SWAPPED
from jestclip.report.groups import RunGroup, as_group
from jestclip.report.runs import RunLog
from jestclip.train.composition import CANDIDATES, LABELLED, LEARNED, ROWS, composition_key

__all__ = ["LAST_QUARTER", "CompositionRow", "composition_groups", "composition_table", "run_composition"]

LAST_QUARTER = 0.75  # "last quarter": lines logged after this share of the run's last logged step
PRECISION = composition_key(LEARNED, CLEAN)
CANDIDATES_CLEAN = composition_key(CANDIDATES, CLEAN)
LEARNED_SWAPPED = composition_key(LEARNED, SWAPPED)
CANDIDATES_SWAPPED = composition_key(CANDIDATES, SWAPPED)


def has_composition(run: RunLog) -> bool:
    """Whether the run's training lines carry the composition fields."""
    return any(line.get(composition_key(CANDIDATES, LABELLED)) for line in run.train)


def _pooled(lines: Sequence[dict[str, Any]], row: str, column: str) -> tuple[int, int]:
    """``(samples with column set, labelled samples)`` of ``row`` over ``lines``."""
    total, labelled = 0, 0
    for line in lines:
        n, share = line.get(composition_key(row, LABELLED)), line.get(composition_key(row, column))
        if n and share is not None:
            total += round(share * n)  # the line's count, exactly: share = count / n
            labelled += n
    return total, labelled


def _share(lines: Sequence[dict[str, Any]], row: str, column: str) -> float | None:
    total, labelled = _pooled(lines, row, column)
    return total / labelled if labelled else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_composition(run: RunLog) -> dict[str, Any] | None:
    """One run's composition over its whole training and its last quarter (module docstring): shares in
    [0, 1], ``lift`` as a ratio, ``*_labelled`` as counts, ``noise``: per noise kind, the shares among
    learned and candidates. None when the run logged no composition."""
    lines = [line for line in run.train if line.get(composition_key(CANDIDATES, LABELLED))]
    if not lines:
        return None
    last = max(int(line["step"]) for line in lines)
    late = [line for line in lines if int(line["step"]) > LAST_QUARTER * last]
    out: dict[str, Any] = {
        "learned_labelled": _pooled(lines, LEARNED, CLEAN)[1],
        "candidates_labelled": _pooled(lines, CANDIDATES, CLEAN)[1],
    }
    for suffix, part in (("", lines), ("_last_quarter", late)):
        precision, base = _share(part, LEARNED, CLEAN), _share(part, CANDIDATES, CLEAN)
        out[f"precision{suffix}"] = precision
        out[f"candidates_clean{suffix}"] = base
        out[f"lift{suffix}"] = _ratio(precision, base)
    out["learned_swapped"] = _share(lines, LEARNED, SWAPPED)
    out["candidates_swapped"] = _share(lines, CANDIDATES, SWAPPED)
    out["noise"] = {kind: {row: _share(lines, row, kind) for row in ROWS} for kind in NOISE_KINDS}
    return out


@dataclass(frozen=True)
class CompositionRow:
    """One run or seed group: ``mean`` and ``std`` over its seeds (those that logged a composition) of each
    number of ``run_composition`` (``noise``: the seed means per kind); a number no seed has is None."""

    run: str
    method: str
    seeds: int
    mean: dict[str, float | None]
    std: dict[str, float | None]
    noise: dict[str, dict[str, float | None]]


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0


def composition_groups(runs: Sequence[RunLog | RunGroup]) -> list[RunGroup]:
    """Each group restricted to its runs that logged a composition; groups with none are left out."""
    out = []
    for group in map(as_group, runs):
        labelled = tuple(r for r in group.runs if has_composition(r))
        if labelled:
            out.append(RunGroup(group.name, labelled))
    return out


def composition_table(runs: Sequence[RunLog | RunGroup]) -> list[CompositionRow]:
    """A row per run or seed group that logged a composition, in order (empty when none did)."""
    rows = []
    for group in composition_groups(runs):
        per_run = [run_composition(r) for r in group.runs]
        keys = [k for k in per_run[0] if k != "noise"]
        stats = {k: _mean_std([r[k] for r in per_run]) for k in keys}
        noise = {
            kind: {row: _mean_std([r["noise"][kind][row] for r in per_run])[0] for row in ROWS}
            for kind in NOISE_KINDS
        }
        rows.append(
            CompositionRow(
                run=group.name,
                method=group.label,
                seeds=len(group.runs),
                mean={k: m for k, (m, _) in stats.items()},
                std={k: s for k, (_, s) in stats.items()},
                noise=noise,
            )
        )
    return rows
