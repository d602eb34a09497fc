"""Evaluation noise: how much `eval/average` moves for ONE checkpoint under other eval subsets and seeds.

Each suite is encoded once; then, for each draw, a random `--fraction` of every suite's samples is kept and
the few-shot split reseeded, and the metrics are recomputed from the features (`jestclip.eval.suite_metrics`).
The spread of the average across draws is the noise a difference between two runs must exceed.

    python benchmarks/eval_noise.py runs/study/iid-s0 --data data/bench --draws 20
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from jestclip.eval import encode_suite, find_suites, is_averaged, suite_metrics, zero_shot_classifiers
from jestclip.models import create_model, image_transform, tokenizer
from jestclip.train.rundir import RunDir


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (its final weights)")
    parser.add_argument("--data", default="data/bench")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.8, help="share of each suite kept per draw")
    args = parser.parse_args()
    run = RunDir(args.run)
    name = run.read_config()["model"]
    model = create_model(name, checkpoint=run.weights()).eval()
    tokenize, transform = tokenizer(name), image_transform(name)
    encoded = []
    with torch.no_grad():
        for suite in find_suites(args.data):
            feats = encode_suite(model, suite, tokenize=tokenize, transform=transform)
            encoded.append((suite, feats, zero_shot_classifiers(model, suite, tokenize=tokenize)))
    full = statistics.fmean(
        v for s, f, c in encoded for k, v in suite_metrics(f, s, c).items() if is_averaged(k)
    )
    averages = []
    for draw in range(args.draws):
        g = torch.Generator().manual_seed(draw)
        values = []
        for suite, feats, classifiers in encoded:
            metrics = suite_metrics(subset(feats, args.fraction, g), suite, classifiers, seed=draw)
            values += [v for k, v in metrics.items() if is_averaged(k)]
        averages.append(statistics.fmean(values))
    print(
        f"| run | full eval | {args.draws} draws of {args.fraction:.0%} (+ few-shot seed): mean | sd | min "
        "| max |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.run} | {100 * full:.2f} | {100 * statistics.fmean(averages):.2f} | "
        f"{100 * statistics.stdev(averages):.2f} | {100 * min(averages):.2f} | {100 * max(averages):.2f} |"
    )


if __name__ == "__main__":
    main()
