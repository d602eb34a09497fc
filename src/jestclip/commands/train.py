"""``jestclip train RECIPE [--quick] [key=value ...]``: train a reference or learner model."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of FLOPs") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a reference or learner model (IID, JEST and the other methods: see --methods)",
        description="Train the run a recipe file describes (configs/*.py), with key=value overrides "
        "(e.g. steps=500 method.batch_size=128 filter_ratio=0.9 method.method=flexi-jest "
        "method.schedule.end=0.25). A run directory that holds a checkpoint is resumed exactly.",
    )
    parser.add_argument("--quick", action="store_true", help="the recipe's small local mode")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--methods", action="store_true", help="list the methods (method.method=NAME) and exit"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--flops-of",
        metavar="RUN",
        help="schedule the run for the total FLOPs another run spent (its last metrics line): steps become "
        "the most whose per-step FLOPs, under the method's selection schedule, fit that budget",
    )
    budget.add_argument(
        "--flops", type=_budget, metavar="N", help="as --flops-of, for a budget of N FLOPs (e.g. 1.07e13)"
    )
    parser.add_argument("recipe", nargs="?", help="a recipe file defining get_config(quick=False)")
    # overrides may be mixed with the two flags above (`train r.py --quick steps=3`); they are split in run()
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE")


def _methods() -> list[str]:
    """One line per method: its name and what a step does (``train.methods.METHODS``)."""
    from jestclip.train.methods import METHODS

    return [f"{name:12s} {method.summary}" for name, method in METHODS.items()]


def _flops_of(run_dir: str) -> float:
    """The total FLOPs of a run: its last metrics line's ``flops_total``."""
    from jestclip.report import load_run

    run = load_run(run_dir)
    lines = [line for line in (*run.train, *run.evals) if line.get("flops_total") is not None]
    if not lines:
        raise ValueError(f"--flops-of {run_dir}: its metrics.jsonl has no flops_total")
    return float(max(lines, key=lambda line: line["step"])["flops_total"])


def _late_options(items: list[str]) -> argparse.Namespace:
    """The train options among the overrides (``train r.py --quick steps=3 --flops-of runs/iid``) and the
    overrides themselves; a ValueError for an unknown option."""
    late = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    late.add_argument("--quick", action="store_true")
    late.add_argument("--print-config", action="store_true")
    late.add_argument("--flops-of")
    late.add_argument("--flops", type=_budget)
    try:
        found, rest = late.parse_known_args(items)
    except (argparse.ArgumentError, argparse.ArgumentTypeError) as exn:
        raise ValueError(str(exn)) from None
    unknown = [item for item in rest if item.startswith("--")]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; overrides are key=value")
    found.overrides = rest
    return found


def _missing_data(cfg) -> str | None:
    """A one-line hint when the run's data or eval data is a local path that does not exist (the README's
    recipes point at the offline benchmark in data/bench, which only `jestclip data build` makes)."""
    from pathlib import Path

    for key, value in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        if value is None or any(mark in value for mark in ("::", ":/", "pipe:", "{", "*", "?")):
            continue  # several shards, a URL or a pattern: the loader checks those
        if not Path(value).exists():
            root = Path(value).parent if Path(value).name in ("pool", "curated") else Path(value)
            return (
                f"{key}={value} does not exist (relative to {Path.cwd()}): build the offline benchmark with "
                f"`jestclip data build {root}` (`jestclip demo` builds a subset in data/bench-demo), or set "
                f"{key}= to your own shards"
            )
    return None


def run(args: argparse.Namespace) -> int:
    if args.methods:
        print("\n".join(_methods()))
        return 0
    if args.recipe is None:
        raise ValueError("give a recipe file (configs/*.py), or --methods")
    from jestclip.train.config import apply_overrides, load_recipe, to_dict
    from jestclip.train.loop import train

    late = _late_options(args.overrides)  # options given after the recipe, among the overrides
    quick = args.quick or late.quick
    print_config = args.print_config or late.print_config
    flops_of, flops = args.flops_of or late.flops_of, args.flops or late.flops
    if flops_of and flops:
        raise ValueError("give --flops-of or --flops, not both")
    cfg = apply_overrides(load_recipe(args.recipe, quick=quick), late.overrides)
    budget = _flops_of(flops_of) if flops_of else flops
    if budget is not None:
        import dataclasses

        from jestclip.train.startup import scheduled_steps

        cfg = dataclasses.replace(cfg, steps=scheduled_steps(cfg, budget))
        print(f"train: {cfg.steps} steps fit a budget of {budget:.4g} FLOPs")
    if print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    missing = _missing_data(cfg)
    if missing is not None:
        raise FileNotFoundError(missing)
    import torch.distributed as dist

    last = train(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(last))
        print(f"run directory: {cfg.run_dir}")
    return 0
