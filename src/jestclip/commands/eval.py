"""``jestclip eval CHECKPOINT``: zero-shot, retrieval and few-shot evaluation of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jestclip.commands.common import device_arg, loading_weights, resolve_device

__all__ = ["add_parser", "run"]

DEFAULT_DATA = "data/bench"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="zero-shot, retrieval and few-shot evaluation of a checkpoint",
        description="Evaluate a trained model on the benchmark's eval suites (or on any shards): zero-shot "
        "top-1, image->text and text->image R@1/R@5 and a 10-shot linear probe. Prints a table and writes "
        "JSON (default: RUN/eval.json for a run directory, CHECKPOINT.eval.json for a weights file).",
    )
    parser.add_argument("checkpoint", type=Path, help="a run directory (jestclip train) or a weights file")
    parser.add_argument(
        "--model", help="with a weights file: its model config name (a run directory's config.json says it)"
    )
    parser.add_argument(
        "--loss",
        choices=["sigmoid", "softmax"],
        help="with a weights file: the loss it was trained with (default: read from the weights; a run "
        "directory's config.json says it)",
    )
    parser.add_argument(
        "--data",
        help="a benchmark root, its eval/ directory or one suite (default: a run directory's own eval_data, "
        f"else {DEFAULT_DATA})",
    )
    parser.add_argument("--suite", action="append", help="evaluate only this suite (repeatable)")
    parser.add_argument(
        "--shards", help="evaluate on these shards instead (path, brace pattern or directory)"
    )
    parser.add_argument(
        "--classes", type=Path, help="with --shards: class names, one per line (line i = id i)"
    )
    parser.add_argument("--label-field", default="label", help="with --classes: the sample JSON field of ids")
    parser.add_argument(
        "--template", action="append", help="with --classes: prompt template(s), e.g. 'a photo of {}.'"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples of each suite")
    parser.add_argument("--shots", type=int, default=10, help="examples per class of the linear probe")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--device", default="auto", type=device_arg, help="cpu, cuda, ... (auto: cuda when available)"
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON results")


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse argument combinations and missing files before loading anything."""
    if not args.shards and (args.classes or args.template):
        raise ValueError("--classes and --template go with --shards (suites carry their own)")
    if args.classes is not None and not args.classes.is_file():
        raise FileNotFoundError(f"--classes file {args.classes} does not exist")


def _out(args: argparse.Namespace) -> Path:
    """Where the JSON results go: ``--out``, else beside the run or weights file."""
    if args.out is not None:
        return args.out
    return args.checkpoint / "eval.json" if args.checkpoint.is_dir() else Path(f"{args.checkpoint}.eval.json")


def _data(args: argparse.Namespace, config) -> str:
    """The eval suites: ``--data``, else the run's own ``eval_data`` (what it evaluated on while training),
    else ``DEFAULT_DATA``."""
    if args.data is not None:
        return args.data
    if config is not None and config.eval_data is not None:
        return config.eval_data
    return DEFAULT_DATA


def run(args: argparse.Namespace) -> int:
    from jestclip.data.files import check_writable
    from jestclip.eval import check_labels, custom_suite, evaluate, find_suites, format_table
    from jestclip.train.trained import find_weights, load_trained

    _check_inputs(args)
    source = find_weights(args.checkpoint, model=args.model, loss=args.loss)  # reads no weights yet
    out = _out(args)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; name the JSON file to write")
    # before anything is encoded: a read-only run directory lost a whole evaluation at its last line
    check_writable(out.parent, "the results' directory", f"pass --out FILE to write {out.name} elsewhere")
    device = resolve_device(args.device)
    if args.shards:
        suites = [
            custom_suite(
                args.shards, classes_file=args.classes, label_field=args.label_field, templates=args.template
            )
        ]
    else:
        suites = find_suites(_data(args, source.config), args.suite)
    for suite in suites:  # label ids from the samples' JSON: a bad one fails now, not after encoding
        check_labels(suite, limit=args.limit)
    with loading_weights(source.weights):  # the suites are checked (templates too) before anything loads
        trained = load_trained(source, device=device)
    results = evaluate(
        trained.model,
        suites,
        tokenize=trained.tokenize,
        transform=trained.transform,
        batch_size=args.batch_size,
        device=device,
        limit=args.limit,
        shots=args.shots,
        progress=True,
    )
    results["config"] = {
        "checkpoint": str(trained.weights),
        "model": trained.name,
        "loss": trained.loss,
        "suites": {s.name: s.urls for s in suites},
        "limit": args.limit,
        "shots": args.shots,
    }
    print(format_table(results), flush=True)  # first: should writing fail now, the results are shown
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"results: {out}")
    return 0
