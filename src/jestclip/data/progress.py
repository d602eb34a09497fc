"""Progress of a long job (training, evaluation, a benchmark build, caching reference embeddings, the demo):
tqdm's bar on a terminal, and plain lines in a log file.

Where output is not a terminal (a scheduler's log, a pipe, ``nohup``), a tqdm bar rewrites one line with a
carriage return at every update: a 300-step run leaves one line of ~600 updates. ``progress`` gives the same
tqdm there, configured to write a complete line at most every ``LINE_INTERVAL_S`` seconds (and at the start
and the end), with an ASCII bar of fixed width.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["LINE_INTERVAL_S", "progress"]

LINE_INTERVAL_S = 30.0  # seconds between two progress lines in a log file


class _Lines:
    """A text stream for tqdm that turns its carriage-return rewrites into whole lines (a status repeated as
    it is, or a blank rewrite, writes nothing)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        for part in text.replace("\n", "\r").split("\r"):
            line = part.rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(
    iterable: Iterable | None = None,
    *,
    file: TextIO | None = None,
    interval: float = LINE_INTERVAL_S,
    **kwargs: Any,
) -> tqdm:
    """A ``tqdm`` over ``iterable`` (kwargs as tqdm's: ``total``, ``desc``, ``unit``, ``initial``,
    ``disable``, ``leave``...) writing to ``file`` (default: stderr): the usual bar when ``file`` is a
    terminal; otherwise one plain line at most every ``interval`` seconds, plus the first and the last.
    """
    file = file if file is not None else sys.stderr
    if _is_terminal(file):
        return tqdm(iterable, file=file, **kwargs)
    kwargs["leave"] = True  # a bar that is not left rewrites its last line blank: a log would lose it
    return tqdm(
        iterable,
        file=_Lines(file),
        mininterval=interval,
        maxinterval=interval,  # tqdm's monitor thread would otherwise refresh every 10 s
        ascii=True,
        ncols=100,
        dynamic_ncols=False,
        **kwargs,
    )
