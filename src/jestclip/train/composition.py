"""What a run learns on, by ground-truth quality: the composition of the learned sub-batch and of the
super-batch it was selected from, counted over the samples that carry a ``quality`` entry
(``data.quality``) and written into the metrics lines.

A super-batch's labels travel as one ``[B, 1 + K]`` int8 tensor (``batch_quality``): column 0 is ``clean``,
column ``1 + k`` noise kind ``NOISE_KINDS[k]``, 1 / 0 for a labelled sample and -1 on every column of a sample
without the entry (the eval suites' "-1 where absent" convention). ``count_composition`` counts one step,
``Composition`` sums the steps between two metrics lines and turns the sums into the line's fields:

- ``candidates/labelled``, ``learned/labelled``: labelled samples among the super-batches' candidates and
  among the examples learned on (counts);
- ``candidates/clean``, ``learned/clean``: the share of those that are clean (``learned/clean`` is the
  selection's precision);
- ``candidates/noise/<kind>``, ``learned/noise/<kind>``: the share carrying noise kind ``<kind>`` (a sample
  may carry several kinds, or none while unclean).

For a method that learns on the batch as drawn (IID) learned and candidates are the same samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from jestclip.data.loader import SuperBatch
from jestclip.data.quality import CLEAN, label_columns, quality_labels

__all__ = [
    "CANDIDATES",
    "COUNTS",
    "LABELLED",
    "LEARNED",
    "ROWS",
    "Composition",
    "batch_quality",
    "composition_key",
    "count_composition",
]

CANDIDATES, LEARNED = "candidates", "learned"  # the rows: the super-batch, and the sub-batch learned on
ROWS = (CANDIDATES, LEARNED)
LABELLED = "labelled"
COUNTS = (LABELLED, *label_columns())  # the columns of ``count_composition``: labelled, clean, kinds...


def composition_key(row: str, column: str) -> str:
    """The metrics-line key of ``row`` (``candidates`` / ``learned``) and ``column`` (``labelled``, ``clean``
    or a noise kind): ``learned/clean``, ``candidates/noise/swapped``, ``learned/labelled``."""
    if row not in ROWS or column not in COUNTS:
        raise ValueError(f"composition key: row must be one of {ROWS} and column one of {COUNTS}")
    return f"{row}/{column}" if column in (LABELLED, CLEAN) else f"{row}/noise/{column}"


def batch_quality(batch: SuperBatch) -> Tensor | None:
    """The super-batch's ground-truth labels as ``[B, 1 + K]`` int8 (module docstring), None when no sample
    carries a ``quality`` entry. A malformed entry is a ValueError naming its shard and key."""
    try:
        found = quality_labels(batch.meta)
    except ValueError:
        for key, url, meta in zip(batch.keys, batch.urls, batch.meta, strict=True):
            try:
                quality_labels([{**meta, "__key__": key}])
            except ValueError as exn:
                raise ValueError(f"{url}: {exn}") from None
        raise
    if found is None:
        return None
    labels, known = found
    return labels.to(torch.int8).masked_fill(~known[:, None], -1)


def _count(quality: Tensor) -> Tensor:
    """``[1 + 1 + K]`` int64: labelled rows, then the rows with each label set."""
    return torch.cat([(quality[:, :1] >= 0).sum(0), (quality == 1).sum(0)])


def count_composition(quality: Tensor, selected: Tensor) -> Tensor:
    """One step's counts, ``[2, 2 + K]`` int64: row 0 the candidates (every row of ``quality``), row 1 the
    learned sub-batch (rows ``selected``); columns ``COUNTS``: labelled samples, then those clean, then those
    carrying each noise kind of ``NOISE_KINDS``.

    ``quality`` is ``[B, 1 + K]`` int8 (``batch_quality``), ``selected`` ``[b]`` indices into its rows
    (``StepOutput.selected``).
    """
    if quality.dim() != 2 or quality.shape[1] != len(COUNTS) - 1:
        columns = len(COUNTS) - 1
        raise ValueError(f"quality must be [B, {columns}] (label_columns()), got {tuple(quality.shape)}")
    return torch.stack([_count(quality), _count(quality[selected])])


class Composition:
    """Composition counts summed over the steps since the last metrics line.

    ``add`` after every step whose update was made (a skipped update learns nothing and counts nothing, as
    for ``examples_learned``); ``line()`` when a metrics line is written: the shares in it cover every step
    the line reports since the previous one, pooled over their labelled samples (not a mean of per-step
    shares), and the sums start again from zero. Under torchrun ``add`` sums the step's counts over the
    ranks (an ``all_reduce`` every rank makes, labelled or not), so every rank holds the global composition.
    The sums are checkpoint state (``state_dict``): a run resumed from a checkpoint between two lines writes
    the lines an uninterrupted run writes.
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None  # [2, 2 + K] int64 on the training device; None: nothing added

    def add(self, quality: Tensor | None, selected: Tensor, world_size: int = 1) -> None:
        """Count one step's candidates and learned rows ``selected`` (this rank's) of ``quality`` (None: no
        labelled sample on this rank); with ``world_size > 1`` every rank must call it for the same steps."""
        if quality is None:
            if world_size == 1:
                return
            counts = torch.zeros(len(ROWS), len(COUNTS), dtype=torch.int64, device=selected.device)
        else:
            counts = count_composition(quality, selected)
        if world_size > 1:
            dist.all_reduce(counts)
        self.counts = counts if self.counts is None else self.counts.to(counts.device) + counts

    def line(self) -> dict[str, int | float | None]:
        """The metrics-line fields of the steps added since the last line (module docstring), and a fresh
        start; empty when none of their candidates was labelled. A share whose row has no labelled sample is
        None."""
        counts, self.counts = self.counts, None
        if counts is None:
            return {}
        rows = counts.tolist()
        if rows[0][0] == 0:
            return {}
        fields: dict[str, int | float | None] = {}
        for row, values in zip(ROWS, rows, strict=True):
            labelled = values[0]
            fields[composition_key(row, LABELLED)] = labelled
            for column, n in zip(COUNTS[1:], values[1:], strict=True):
                fields[composition_key(row, column)] = n / labelled if labelled else None
        return fields

    def state_dict(self) -> dict[str, dict[str, int]] | None:
        """The sums by row and column name (None when nothing was added since the last line)."""
        if self.counts is None:
            return None
        rows = zip(ROWS, self.counts.tolist(), strict=True)
        return {row: dict(zip(COUNTS, values, strict=True)) for row, values in rows}

    def load_state_dict(self, state: dict[str, dict[str, int]] | None) -> None:
        """Restore ``state_dict()``'s sums (None: nothing added); a column name jestclip no longer knows is a
        ValueError naming it."""
        if state is None:
            self.counts = None
            return
        unknown = sorted({c for row in state.values() for c in row} - set(COUNTS))
        if unknown or set(state) != set(ROWS):
            raise ValueError(
                f"checkpoint 'composition': rows must be {ROWS} and columns from {COUNTS}, got rows "
                f"{sorted(state)} and unknown columns {unknown}"
            )
        counts = [[state[row].get(c, 0) for c in COUNTS] for row in ROWS]  # a kind added since: 0
        self.counts = torch.tensor(counts, dtype=torch.int64)
