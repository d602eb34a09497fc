"""The ``jestclip`` command line: one subcommand per job, each in ``jestclip.commands``.

A user's mistake ends a command with one line on stderr, ``jestclip COMMAND: MESSAGE``, and exit status 2
(``--debug`` shows the traceback too); see ``jestclip.commands.common`` for which errors those are and the
exit statuses of a training run's own endings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from jestclip.commands.common import Terminated, exit_status, terminate

# subcommand -> its module in jestclip.commands (add_parser(sub) and run(args) -> exit status). Command
# modules import only the standard library at top level and resolve defaults such as the device in run(),
# so building the parser and printing help never loads torch, open_clip or numpy (tests/test_cli.py).
_COMMANDS = {
    "data": "jestclip.commands.data",
    "cache-reference": "jestclip.commands.cache_reference",
    "check-reference": "jestclip.commands.check_reference",
    "filter": "jestclip.commands.filter",
    "train": "jestclip.commands.train",
    "eval": "jestclip.commands.eval",
    "report": "jestclip.commands.report",
    "demo": "jestclip.commands.demo",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``jestclip eval: the following arguments are required: checkpoint``, exit
    status 2 (subcommand parsers are of this class too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from jestclip import __version__

    parser = _Parser(
        prog="jestclip",
        description="Joint example selection (JEST) for contrastive image-text training with open_clip.",
    )
    parser.add_argument("--version", action="version", version=f"jestclip {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not only its one-line message"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit status (2 and one line on stderr for a user's mistake; 143 and one line
    for SIGTERM, from this function's first line on: during imports and parsing too)."""
    previous = signal.signal(signal.SIGTERM, terminate(os.getpid()))  # first: `jestclip train` replaces it
    try:
        return _main(argv)
    except Terminated as exn:  # before the subcommand was known
        print(f"jestclip: {exn}", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(_COMMANDS[args.command]).run(args)
    except BaseException as exn:  # bugs propagate with their traceback; every other ending is one line
        ending = exit_status(exn)
        if ending is None:
            raise
        if args.debug:
            traceback.print_exc()
        status, message = ending
        print(f"jestclip {args.command}: {message.removeprefix(f'{args.command}: ')}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
