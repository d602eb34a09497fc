"""The ``jestclip`` command line: one subcommand per job.

Each subcommand lives in its own module and registers itself here; those not built yet say so and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# name -> (one-line help, issue that builds it)
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("build the offline image-text benchmark and inspect webdataset shards", "issue 3 (Data)"),
    "cache-reference": ("embed shards with a frozen reference model and store the embeddings", "issue 4"),
    "train": ("train a reference or learner model (iid / jest / independent / flexi-jest)", "issue 4"),
    "eval": ("zero-shot, retrieval and few-shot evaluation of a checkpoint", "issue 5"),
    "report": ("plots and speed-up-to-target tables comparing runs", "issue 5"),
    "demo": ("build data, train reference, IID and JEST learners, evaluate and report", "issue 5"),
}


def build_parser() -> argparse.ArgumentParser:
    from jestclip import __version__

    parser = argparse.ArgumentParser(
        prog="jestclip",
        description="Joint example selection (JEST) for contrastive image-text training with open_clip.",
    )
    parser.add_argument("--version", action="version", version=f"jestclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, issue = _SUBCOMMANDS[args.command]
    print(f"jestclip {args.command}: not implemented yet (built by {issue})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
