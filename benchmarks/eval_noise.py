"""Evaluation noise: how much `eval/average` moves for ONE checkpoint under other eval subsets and seeds.

Each suite is encoded once; then, for each draw, a random `--fraction` of every suite's samples is kept and
the few-shot split reseeded, and the metrics are recomputed from the features (`jestclip.eval.suite_metrics`).
The spread of the average across draws is the noise a difference between two runs must exceed.

    python benchmarks/eval_noise.py runs/study/iid-s0 --data data/bench --draws 20
    python benchmarks/eval_noise.py runs/study/iid-s1 runs/study/jest-f08-s1   # + B - A, paired by draw
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from jestclip.eval import encode_suite, find_suites, is_averaged, suite_metrics, zero_shot_classifiers
from jestclip.train.trained import load_trained


def subset(feats, fraction: float, generator: torch.Generator):
    """A random ``fraction`` of the suite's rows (the same rows of every field)."""
    n = feats.image.shape[0]
    rows = torch.randperm(n, generator=generator)[: max(1, round(fraction * n))].sort().values
    return dataclasses.replace(
        feats,
        image=feats.image[rows],
        text=feats.text[rows],
        labels={k: v[rows] for k, v in feats.labels.items()},
        concepts=feats.concepts[rows],
        keys=[feats.keys[i] for i in rows.tolist()],
    )


def encode_run(path: str, data: str) -> list:
    """(suite, features, zero-shot classifiers) per suite under ``data``, for ``path``'s final weights."""
    trained = load_trained(path)  # the run's own model, loss and preprocessing
    model, tokenize, transform = trained.model, trained.tokenize, trained.transform
    with torch.no_grad():
        return [
            (
                suite,
                encode_suite(model, suite, tokenize=tokenize, transform=transform),
                zero_shot_classifiers(model, suite, tokenize=tokenize),
            )
            for suite in find_suites(data)
        ]


def average(encoded: list, draw: int | None, fraction: float) -> float:
    """The held-out average on every suite; for a ``draw``, on its random ``fraction`` of each suite's samples
    with its few-shot split seed (the same rows and seed for every run: suites are drawn in order)."""
    if draw is None:
        return statistics.fmean(
            v for s, f, c in encoded for k, v in suite_metrics(f, s, c).items() if is_averaged(k)
        )
    g = torch.Generator().manual_seed(draw)
    values = []
    for suite, feats, classifiers in encoded:
        metrics = suite_metrics(subset(feats, fraction, g), suite, classifiers, seed=draw)
        values += [v for k, v in metrics.items() if is_averaged(k)]
    return statistics.fmean(values)


def row(label: str, full: float, values: list[float], sign: str = "") -> str:
    """A table row in points: the full evaluation, then mean, sd, min and max over the draws."""
    cells = [f"{100 * c:{sign}.2f}" for c in (full, statistics.fmean(values))]
    cells.append(f"{100 * statistics.stdev(values):.2f}")
    cells += [f"{100 * c:{sign}.2f}" for c in (min(values), max(values))]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        help="run directories (their final weights); given as pairs A1 B1 A2 B2 ..., "
        "each B's difference from its A under the same draws is printed too",
    )
    parser.add_argument("--data", default="data/bench")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.8, help="share of each suite kept per draw")
    args = parser.parse_args()
    encoded = {path: encode_run(path, args.data) for path in args.runs}
    full = {path: average(e, None, args.fraction) for path, e in encoded.items()}
    draws = {path: [average(e, d, args.fraction) for d in range(args.draws)] for path, e in encoded.items()}
    print(
        f"| run | full eval | {args.draws} draws of {args.fraction:.0%} (+ few-shot seed): mean | sd | min "
        "| max |"
    )
    print("|---|---|---|---|---|---|")
    for path in dict.fromkeys(args.runs):
        print(row(path, full[path], draws[path]))
    for base, path in zip(args.runs[::2], args.runs[1::2], strict=False):
        diff = [a - b for a, b in zip(draws[path], draws[base], strict=True)]
        print(row(f"{path} − {base}, paired by draw", full[path] - full[base], diff, sign="+"))


if __name__ == "__main__":
    main()
