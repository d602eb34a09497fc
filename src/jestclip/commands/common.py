"""What the commands share: the ``--device`` argument, loading weights, and how an error ends a command.

Every way a command ends is one line on stderr (``--debug`` adds the traceback) and an exit status that
tells a person or a scheduler what to do, ``EXIT_STATUSES`` (the table in docs/reliability.md): 0 done;
1 the run stopped itself (``TrainingDiverged``, ``OutOfMemory``, ``CheckpointWriteError``,
``FinalEvaluationFailed``, a full disk); 2 the user's error (a bad path, value, file or config, a place
that cannot be written); 75 interrupted from outside before a checkpoint (``Interrupted``: a data loader
worker killed, often by the out-of-memory killer; EX_TEMPFAIL), rerun to resume from the checkpoint it
names; 130 SIGINT; 143 SIGTERM (``Preempted``: checkpointed first during training), rerun to resume.
Anything else is a bug and keeps its traceback. Standard library only at top level (``jestclip --help``
imports no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType

from jestclip.signals import deliver_again, inside_import

__all__ = [
    "EXIT_STATUSES",
    "RUN_EXITS",
    "USER_ERRORS",
    "Terminated",
    "device_arg",
    "exit_status",
    "join_ranks",
    "loading_weights",
    "one_line",
    "resolve_device",
    "terminate",
    "weights_load_failure",
]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

# the training run's own exceptions, by name, and the exit status each ends the command with: 143 = 128 +
# SIGTERM, what schedulers read as "killed by SIGTERM, requeue"
RUN_EXITS: dict[str, int] = {
    "Preempted": 143,
    "Interrupted": 75,  # EX_TEMPFAIL: a worker died (the out-of-memory killer); rerun to resume
    "TrainingDiverged": 1,
    "OutOfMemory": 1,  # GPU or host memory in the main process: ask for less, then rerun to resume
    "CheckpointWriteError": 1,
    "FinalEvaluationFailed": 1,  # the training is saved; a rerun evaluates only
}
# every exit status a command ends with -> what it means (the table above)
EXIT_STATUSES: dict[int, str] = {
    0: "done",
    1: "the run stopped itself (diverged, out of memory, a checkpoint not written, the final evaluation "
    "failed, a full disk): look at it, then rerun",
    2: "the user's error (a bad path, value, file or config; a place that cannot be written): fix it",
    75: "interrupted from outside before a checkpoint (a data loader worker killed): rerun the same command "
    "to resume from the checkpoint it names",
    130: "interrupted by SIGINT: rerun the same command to resume",
    143: "preempted by SIGTERM (checkpointed first in training): rerun (requeue) the same command to resume",
}
# an OSError of these is the user's (a read-only mount is no permission too), of these the run's own
_USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
_RUN_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# where they are defined or exported; looked up only once loaded (a run that raised one has loaded them)
_RUN_MODULES = ("jestclip.train.loop", "jestclip.train.rundir", "jestclip.train")


class Terminated(BaseException):
    """SIGTERM outside a training run's own handling (interpreter imports, argument parsing, any other
    command): the command stops at once and exits 143. A BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way (a loader counting a bad shard, say) takes it for an ordinary error."""

    def __init__(self, message: str = "preempted by SIGTERM; rerun the same command") -> None:
        super().__init__(message)


def terminate(pid: int) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler raising ``Terminated`` in process ``pid`` only: forked loader workers, which inherit
    it, ignore the signal (their parent stops them). One that comes during an import is delivered again once
    the import is done (``jestclip.signals``)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != pid:
            return
        if inside_import(frame):  # raising into a module's initialisation can abort the interpreter
            deliver_again(signum, pid)
            return
        raise Terminated()

    return handler


def one_line(exn: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    text = str(exn.code) if isinstance(exn, SystemExit) else str(exn)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exn).__name__


def _run_exit(exn: BaseException) -> int | None:
    for module_name in _RUN_MODULES:
        module = sys.modules.get(module_name)
        for name, status in RUN_EXITS.items():
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException) and isinstance(exn, cls):
                return status
    return None


def weights_load_failure(exn: BaseException) -> str | None:
    """The file ``torch.load`` failed on, when ``exn`` was raised inside it (a damaged or foreign file)."""
    tb: TracebackType | None = exn.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "load" and Path(code.co_filename).parts[-2:] == ("torch", "serialization.py"):
            return str(tb.tb_frame.f_locals.get("f", "a weights file"))
        tb = tb.tb_next
    return None


def _weights_message(file: str, exn: BaseException) -> str:
    kind, first = type(exn).__name__, one_line(exn).split(". ")[0][:200]
    return f"cannot load weights from {file}: {kind if first == kind else f'{kind}: {first}'}"


@contextlib.contextmanager
def loading_weights(path: str | Path) -> Iterator[None]:
    """A failure of ``torch.load`` in the block becomes a ValueError "cannot load weights from PATH: ..."."""
    try:
        yield
    except Exception as exn:
        if weights_load_failure(exn) is None:
            raise
        raise ValueError(_weights_message(str(path), exn)) from exn


def exit_status(exn: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) of an exception that ends a command without a traceback; None for a
    bug (or a ``SystemExit`` with a status rather than a message), which propagates."""
    status = 143 if isinstance(exn, Terminated) else _run_exit(exn)
    if status is not None:
        return status, one_line(exn)
    if isinstance(exn, KeyboardInterrupt):
        return 130, one_line(exn) if str(exn) else "interrupted by SIGINT; rerun the same command"
    stream = sys.modules.get("jestclip.data.stream")  # a worker died outside a training run's own handling
    dead = stream.dead_loader_worker(exn) if stream is not None else None
    if dead is not None:
        return 75, f"interrupted: {dead}; rerun the same command"
    if isinstance(exn, SystemExit):
        return (2, one_line(exn)) if isinstance(exn.code, str) else None
    if isinstance(exn, USER_ERRORS):
        return 2, one_line(exn)
    if isinstance(exn, OSError) and exn.errno in _USER_ERRNOS + _RUN_ERRNOS:
        where = f" writing {exn.filename}" if exn.filename else ""
        return (2 if exn.errno in _USER_ERRNOS else 1), f"{os.strerror(exn.errno).lower()}{where}"
    file = weights_load_failure(exn)
    if file is not None and isinstance(exn, Exception):
        return 2, _weights_message(file, exn)
    return None


def resolve_device(device: str) -> str:
    """``device``, with "auto" resolved to cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_arg(text: str) -> str:
    """argparse type of ``--device``: "auto" or a torch device string (torch is imported only to check
    anything other than auto / cpu / cuda)."""
    if text in ("auto", "cpu", "cuda"):
        return text
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1'"
        ) from None
    return text


def join_ranks():
    """Under torchrun (``WORLD_SIZE`` > 1), the process group of a pool-wide command (gloo: its collectives
    are counts and records), initialised once; this process's ``data.ranks.Ranks``."""
    import torch.distributed as dist

    from jestclip.data.ranks import Ranks

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks.current()
