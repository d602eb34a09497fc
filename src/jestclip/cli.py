"""The ``jestclip`` command line: one subcommand per job, each in ``jestclip.commands``.

Subcommands not built yet say so and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommands with a module in jestclip.commands
_BUILT = {
    "data": "jestclip.commands.data",
    "cache-reference": "jestclip.commands.cache_reference",
    "train": "jestclip.commands.train",
    "eval": "jestclip.commands.eval",
    "report": "jestclip.commands.report",
    "demo": "jestclip.commands.demo",
}
# name -> (one-line help, issue that builds it)
_PLANNED: dict[str, tuple[str, str]] = {}


def build_parser() -> argparse.ArgumentParser:
    from jestclip import __version__

    parser = argparse.ArgumentParser(
        prog="jestclip",
        description="Joint example selection (JEST) for contrastive image-text training with open_clip.",
    )
    parser.add_argument("--version", action="version", version=f"jestclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _BUILT.values():
        importlib.import_module(module).add_parser(sub)
    for name, (help_text, _) in _PLANNED.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _BUILT:
        return importlib.import_module(_BUILT[args.command]).run(args)
    _, issue = _PLANNED[args.command]
    print(f"jestclip {args.command}: not implemented yet (built by {issue})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
