"""``jestclip train RECIPE [--quick] [key=value ...]``: train a reference or learner model."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a reference or learner model (iid / jest / independent / flexi-jest)",
        description="Train the run a recipe file describes (configs/*.py), with key=value overrides "
        "(e.g. steps=500 method.batch_size=128 filter_ratio=0.9). A run directory that holds a checkpoint "
        "is resumed exactly.",
    )
    parser.add_argument("--quick", action="store_true", help="the recipe's small local mode")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("recipe", help="a recipe file defining get_config(quick=False)")
    # overrides may be mixed with the two flags above (`train r.py --quick steps=3`); they are split in run()
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    from jestclip.train.config import apply_overrides, load_recipe, to_dict
    from jestclip.train.loop import train

    flags = {"--quick", "--print-config"}
    quick = args.quick or "--quick" in args.overrides
    print_config = args.print_config or "--print-config" in args.overrides
    overrides = [item for item in args.overrides if item not in flags]
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; overrides are key=value")
    cfg = apply_overrides(load_recipe(args.recipe, quick=quick), overrides)
    if print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    import torch.distributed as dist

    last = train(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(last))
        print(f"run directory: {cfg.run_dir}")
    return 0
