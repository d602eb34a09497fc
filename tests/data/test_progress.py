"""Progress of long jobs: tqdm's bar on a terminal, a plain line every so often in a log file."""

from __future__ import annotations

import io

import pytest

from jestclip.data.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_and_a_terminal_the_bar():
    log = io.StringIO()
    bar = progress(total=300, desc="run", unit="step", file=log, interval=3600)
    for step in range(300):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", refresh=False)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text  # before: one line of ~600 carriage-return rewrites
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n")  # the start and the end (no interval passed)
    assert lines[0].startswith("run:   0%|") and " 0/300 " in lines[0]
    assert lines[1].startswith("run: 100%|") and " 300/300 " in lines[1] and "loss=0.003" in lines[1]
    terminal = Terminal()
    bar = progress(total=3, desc="run", file=terminal, mininterval=0)
    bar.update(3)
    bar.close()
    assert terminal.getvalue().count("\r") >= 2  # tqdm as it is


def test_a_log_file_gets_a_line_per_interval(monkeypatch):
    clock = iter(range(0, 10**6, 10))  # every call of tqdm's clock advances it 10 s
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))  # what a tqdm reads the time with
    log = io.StringIO()
    for _ in progress(range(100), desc="cache", unit="shard", file=log, interval=100.0):
        pass
    lines = log.getvalue().splitlines()
    assert 5 <= len(lines) <= 30 and all(line.startswith("cache: ") for line in lines)
    assert " 100/100 " in lines[-1]


@pytest.mark.parametrize("leave", [True, False])
def test_a_disabled_bar_writes_nothing(leave):
    log = io.StringIO()
    bar = progress(total=5, file=log, disable=True, leave=leave)
    bar.update(5)
    bar.close()
    assert log.getvalue() == ""


def test_a_bar_not_left_on_a_terminal_still_writes_its_last_line_to_a_log():
    """``leave=False`` (eval suites, the pool's decode) clears a terminal's bar; a log keeps its last line."""
    log = io.StringIO()
    bar = progress(total=4, desc="suite", file=log, interval=3600, leave=False)
    bar.update(4)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("suite: 100%|") and " 4/4 " in lines[-1]
