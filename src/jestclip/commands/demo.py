"""``jestclip demo``: the whole method end to end on the built-in benchmark (``jestclip.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jestclip.commands.common import device_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="build data, train reference, IID and JEST learners, evaluate and report",
        description="Run the whole method on the built-in benchmark with tiny models (its time on a "
        "2-core CPU: docs/benchmarks.md; a GPU is used when present): build a benchmark subset in "
        "data/bench-demo if "
        "absent, train a reference on curated, cache its embeddings, train IID and JEST learners on pool "
        "with periodic evaluation, and write a report. Re-running reuses what is already built.",
    )
    parser.add_argument("--reduced", action="store_true", help="a tiny end-to-end check (what CI runs)")
    parser.add_argument("--data", help="benchmark directory (default: data/bench-demo, built if absent)")
    parser.add_argument("--out", help="directory for the runs and the report (default: runs/demo)")
    parser.add_argument("--device", type=device_arg, help="cpu, cuda, ... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    for name in ("data", "out"):  # before anything is built or written
        path = getattr(args, name)
        if path and Path(path).exists() and not Path(path).is_dir():
            raise NotADirectoryError(f"--{name} {path} is a file, not a directory")
    import dataclasses

    from jestclip.data.files import check_writable
    from jestclip.demo import DemoConfig, run_demo

    cfg = DemoConfig.reduced() if args.reduced else DemoConfig()
    changes = {k: v for k, v in (("data", args.data), ("out", args.out), ("device", args.device)) if v}
    cfg = dataclasses.replace(cfg, **changes)
    check_writable(cfg.out, "--out", "pass --out DIR to write the runs and report elsewhere")
    # the benchmark is built there when absent, and the reference's sidecars are written beside its shards
    check_writable(cfg.data, "--data", "pass --data DIR to build the benchmark in a directory of your own")
    report = run_demo(cfg)
    print(f"\nreport: {report}")
    return 0
