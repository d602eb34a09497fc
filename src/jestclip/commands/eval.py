"""``jestclip eval CHECKPOINT``: zero-shot, retrieval and few-shot evaluation of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jestclip.commands.common import device_arg, loading_weights, resolve_device

__all__ = ["add_parser", "resolve_checkpoint", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="zero-shot, retrieval and few-shot evaluation of a checkpoint",
        description="Evaluate a trained model on the benchmark's eval suites (or on any shards): zero-shot "
        "top-1, image->text and text->image R@1/R@5 and a 10-shot linear probe. Prints a table and writes "
        "JSON (default: RUN/eval.json for a run directory, CHECKPOINT.eval.json for a weights file).",
    )
    parser.add_argument("checkpoint", type=Path, help="a run directory (jestclip train) or a weights file")
    parser.add_argument("--model", help="model config name (read from the run's config.json if omitted)")
    parser.add_argument(
        "--data",
        default="data/bench",
        help="a benchmark root, its eval/ directory or one suite (default: %(default)s)",
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


def resolve_checkpoint(path: Path, model: str | None) -> tuple[Path, str]:
    """(weights file, model name) of a run directory or a weights file."""
    if path.is_dir():
        from jestclip.train.rundir import RunDir

        run = RunDir(path)
        config = run.read_config()  # first: a directory that is no run says so
        return run.weights(), model or config["model"]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if model is None:
        raise ValueError(f"{path} is a weights file; say which model it holds with --model")
    return path, model


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse argument combinations and missing files before loading anything."""
    if not args.shards and (args.classes or args.template):
        raise ValueError("--classes and --template go with --shards (suites carry their own)")
    if args.classes is not None and not args.classes.is_file():
        raise FileNotFoundError(f"--classes file {args.classes} does not exist")


def run(args: argparse.Namespace) -> int:
    from jestclip.eval import custom_suite, evaluate, find_suites, format_table
    from jestclip.models import create_model, image_transform, tokenizer

    _check_inputs(args)
    weights, model_name = resolve_checkpoint(args.checkpoint, args.model)
    device = resolve_device(args.device)
    if args.shards:
        suites = [
            custom_suite(
                args.shards, classes_file=args.classes, label_field=args.label_field, templates=args.template
            )
        ]
    else:
        suites = find_suites(args.data, args.suite)
    with loading_weights(weights):
        model = create_model(model_name, checkpoint=weights, device=device)
    results = evaluate(
        model,
        suites,
        tokenize=tokenizer(model_name),
        transform=image_transform(model_name),
        batch_size=args.batch_size,
        device=device,
        limit=args.limit,
        shots=args.shots,
        progress=True,
    )
    results["config"] = {
        "checkpoint": str(weights),
        "model": model_name,
        "suites": {s.name: s.urls for s in suites},
        "limit": args.limit,
        "shots": args.shots,
    }
    out = args.out or (
        args.checkpoint / "eval.json" if args.checkpoint.is_dir() else Path(f"{args.checkpoint}.eval.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(format_table(results))
    print(f"results: {out}")
    return 0
