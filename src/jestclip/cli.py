"""The ``jestclip`` command line: one subcommand per job, each in ``jestclip.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> its module in jestclip.commands (add_parser(sub) and run(args) -> exit status). Command
# modules import only the standard library at top level and resolve defaults such as the device in run(),
# so building the parser and printing help never loads torch, open_clip or numpy (tests/test_cli.py).
_COMMANDS = {
    "data": "jestclip.commands.data",
    "cache-reference": "jestclip.commands.cache_reference",
    "train": "jestclip.commands.train",
    "eval": "jestclip.commands.eval",
    "report": "jestclip.commands.report",
    "demo": "jestclip.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    from jestclip import __version__

    parser = argparse.ArgumentParser(
        prog="jestclip",
        description="Joint example selection (JEST) for contrastive image-text training with open_clip.",
    )
    parser.add_argument("--version", action="version", version=f"jestclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(_COMMANDS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
