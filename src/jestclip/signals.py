"""Stopping on SIGTERM without raising into an import.

A Python signal handler runs between two bytecodes of whatever Python code the main thread is running —
also the Python code a C extension calls while it initialises (``import torch``). An exception raised there
can reach C++ that cannot pass it on, and the interpreter aborts (SIGABRT, exit -6) instead of stopping with
its line. So a handler that stops the command asks ``inside_import(frame)`` first and, when the signal came
during an import, has it delivered again a moment later (``deliver_again``): the command stops as soon as
the import is done, never inside it. Imports nothing (neither torch nor jestclip), so the CLI can install a
handler on its first line.
"""

from __future__ import annotations

import os
import threading
from types import FrameType

__all__ = ["RETRY_S", "deliver_again", "inside_import"]

RETRY_S = 0.05  # seconds before a signal that came during an import is delivered again


def inside_import(frame: FrameType | None) -> bool:
    """Whether ``frame`` (a signal handler's) runs inside an import: importlib's frames are on its stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def deliver_again(signum: int, pid: int | None = None, delay: float = RETRY_S) -> None:
    """Send ``signum`` to process ``pid`` (default: this one) again after ``delay`` seconds."""
    timer = threading.Timer(delay, os.kill, (os.getpid() if pid is None else pid, signum))
    timer.daemon = True
    timer.start()
