"""Evaluation noise and signal of candidate held-out metrics (docs/studies/study1.md: "Evaluation noise" and
"Study II: the metric, chosen before the runs").

Each suite is encoded once per checkpoint; then, for each draw, a random `--fraction` of every suite's samples
is kept, the few-shot split and the retrieval galleries reseeded, and every candidate metric recomputed from
the features (`jestclip.eval.suite_metrics`). With `--fraction 0.5` the spread over draws estimates the
standard error of the metric on the full suites (half-sampling: a half subset's mean varies around the full
mean by sigma^2 / N, the full mean's own sampling variance). The first checkpoint is the baseline: each
other's signal is its full-evaluation value minus the baseline's, and signal / noise divides it by the sd
of its draws.

    python -m experiments.eval_noise runs/study/iid-s0 --data data/bench --draws 20
    python -m experiments.eval_noise untrained:jest-micro runs/study2/ref-weak runs/study2/ref-strong \
        --fraction 0.5 --table
    python -m experiments.eval_noise runs/study/iid-s1 runs/study/jest-f08-s1 --paired   # B - A by draw
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable

import torch

from jestclip.eval import (
    encode_suite,
    find_suites,
    gallery_r5,
    is_averaged,
    suite_metrics,
    zero_shot_classifiers,
)
from jestclip.eval.evaluate import FEWSHOT_SEEDS, GALLERY_SIZE
from jestclip.eval.metrics import galleries
from jestclip.models import create_model, image_transform, tokenizer
from jestclip.models.factory import logit_params
from jestclip.selection.embeddings import Embeddings
from jestclip.selection.filter import pair_losses
from jestclip.train.trained import load_trained

Metrics = dict[str, dict[str, float]]  # suite -> metric -> value, plus "heldout_loss" per retrieval suite


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _pick(metrics: Metrics, prefix: str) -> list[float]:
    return [v for m in metrics.values() for k, v in m.items() if k.startswith(prefix)]


def _gallery_r1(m: Metrics) -> float:
    return _mean(_pick(m, "gallery:i2t_r@1") + _pick(m, "gallery:t2i_r@1"))


def _fewshot_mean(m: Metrics) -> float:
    return _mean(_pick(m, "fewshot_mean:"))


def _zeroshot_coarse(m: Metrics) -> float:
    return (m["emoji"]["zeroshot_balanced:group"] + m["openclipart"]["zeroshot_balanced:folder"]) / 2


# name -> (what it is, value from every suite's metrics; higher is better for every one)
CANDIDATES: dict[str, tuple[str, Callable[[Metrics], float]]] = {
    "average": (
        "paper-style average of every suite (zero-shot and few-shot balanced, R@1 both ways)",
        lambda m: _mean([v for s in m.values() for k, v in s.items() if is_averaged(k)]),
    ),
    "gallery_r1": (f"R@1 both ways within galleries of {GALLERY_SIZE} (emoji, icons, TuxPaint)", _gallery_r1),
    "gallery_r5": (
        f"R@5 both ways within galleries of {GALLERY_SIZE} (`jestclip.eval.gallery_r5`)",
        gallery_r5,
    ),
    "fewshot_mean": (
        "10-shot balanced accuracy over 5 split seeds (emoji subgroup, OpenClipart folder)",
        _fewshot_mean,
    ),
    "zeroshot_group": (
        "emoji group zero-shot, balanced (9 classes)",
        lambda m: m["emoji"]["zeroshot_balanced:group"],
    ),
    "zeroshot_folder": (
        "OpenClipart folder zero-shot, balanced (64 classes)",
        lambda m: m["openclipart"]["zeroshot_balanced:folder"],
    ),
    "zeroshot_coarse": ("mean of the two coarse zero-shot tasks above", _zeroshot_coarse),
    "steady_average": (
        "mean of gallery_r1, fewshot_mean and zeroshot_coarse",
        lambda m: _mean([_gallery_r1(m), _fewshot_mean(m), _zeroshot_coarse(m)]),
    ),
    "heldout_loss": (
        f"minus the model's own contrastive loss per pair (nats) on held-out clean pairs in galleries of "
        f"{GALLERY_SIZE}",
        lambda m: -_mean([s["heldout_loss"] for s in m.values() if "heldout_loss" in s]),
    ),
}


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


@dataclasses.dataclass
class Encoded:
    """One checkpoint's suites, encoded: (suite, features, zero-shot classifiers) each, and its loss."""

    suites: list
    loss: str
    scale: float
    bias: float


def encode_run(path: str, data: str) -> Encoded:
    """Every suite under ``data`` encoded by ``path``'s final weights, or, for ``untrained:MODEL[:SEED]``,
    by a fresh sigmoid-loss ``MODEL`` initialised after ``torch.manual_seed(SEED)`` (default 0)."""
    if path.startswith("untrained:"):
        name, _, seed = path.removeprefix("untrained:").partition(":")
        torch.manual_seed(int(seed or 0))
        model, loss = create_model(name, loss="sigmoid").eval(), "sigmoid"
        tokenize, transform = tokenizer(name), image_transform(name)
    else:
        trained = load_trained(path)  # the run's own model, loss and preprocessing
        model, loss, tokenize, transform = trained.model, trained.loss, trained.tokenize, trained.transform
    scale, bias = logit_params(model)
    with torch.no_grad():
        suites = [
            (
                suite,
                encode_suite(model, suite, tokenize=tokenize, transform=transform),
                zero_shot_classifiers(model, suite, tokenize=tokenize),
            )
            for suite in find_suites(data)
        ]
    return Encoded(suites, loss, float(scale.detach()), float(bias.detach()))


def heldout_loss(feats, encoded: Encoded, seed: int) -> float:
    """Mean per-pair contrastive loss (row and column, nats) of the suite's pairs within seeded galleries
    of ``GALLERY_SIZE`` (`selection.filter.pair_losses`, the model's own loss, scale and bias)."""
    losses = [
        pair_losses(Embeddings(feats.image[g], feats.text[g], encoded.scale, encoded.bias), encoded.loss)
        for g in galleries(feats.image.shape[0], GALLERY_SIZE, seed=seed)
    ]
    return float(torch.cat(losses).double().mean())


def metrics(encoded: Encoded, draw: int | None, fraction: float) -> Metrics:
    """Every suite's metrics on all its samples (``draw`` None: split and gallery seed 0, as in training), or
    on a draw's random ``fraction`` of them with the draw's seeds (the same rows for every checkpoint)."""
    g = torch.Generator().manual_seed(draw or 0)
    seed = (draw or 0) * FEWSHOT_SEEDS  # draws use disjoint split seeds (fewshot_mean takes FEWSHOT_SEEDS)
    out: Metrics = {}
    for suite, feats, classifiers in encoded.suites:
        if draw is not None:
            feats = subset(feats, fraction, g)
        out[suite.name] = suite_metrics(feats, suite, classifiers, seed=seed)
        if "retrieval" in suite.tasks:
            out[suite.name]["heldout_loss"] = heldout_loss(feats, encoded, seed)
    return out


def row(label: str, full: float, values: list[float], sign: str = "") -> str:
    """A table row in points: the full evaluation, then mean, sd, min and max over the draws."""
    cells = [f"{100 * c:{sign}.2f}" for c in (full, statistics.fmean(values))]
    cells.append(f"{100 * statistics.stdev(values):.2f}")
    cells += [f"{100 * c:{sign}.2f}" for c in (min(values), max(values))]
    return f"| {label} | " + " | ".join(cells) + " |"


def choice_table(paths: list[str], full: dict, draws: dict) -> list[str]:
    """One row per candidate: each checkpoint's full value (sd over draws), then the last checkpoint's
    signal over the first and signal / noise (the last checkpoint's sd)."""
    base, last = paths[0], paths[-1]
    lines = [
        "| metric | " + " | ".join(f"{p} (sd)" for p in paths) + " | signal | signal / sd |",
        "|---|" + "---|" * (len(paths) + 2),
    ]
    for name, (_, value) in CANDIDATES.items():
        unit, digits = (1, 4) if name == "heldout_loss" else (100, 2)  # nats; the others in points
        sds = {p: statistics.stdev([value(m) for m in draws[p]]) for p in paths}
        cells = [f"{unit * value(full[p]):.{digits}f} ({unit * sds[p]:.{digits}f})" for p in paths]
        signal = value(full[last]) - value(full[base])
        ratio = f"{signal / sds[last]:.1f}" if sds[last] > 0 else "— (no spread)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {unit * signal:+.{digits}f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        help="run directories (their final weights) or untrained:MODEL[:SEED]; the first is the baseline",
    )
    parser.add_argument("--data", default="data/bench")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.8, help="share of each suite kept per draw")
    parser.add_argument("--metric", default="average", choices=sorted(CANDIDATES), help="for the run table")
    parser.add_argument("--paired", action="store_true", help="runs are pairs A1 B1 A2 B2 ...: print B - A")
    parser.add_argument("--table", action="store_true", help="print every candidate's signal and noise")
    parser.add_argument("--json", help="write every checkpoint's full and per-draw metrics here")
    args = parser.parse_args()
    encoded = {path: encode_run(path, args.data) for path in args.runs}
    full = {path: metrics(e, None, args.fraction) for path, e in encoded.items()}
    draws = {path: [metrics(e, d, args.fraction) for d in range(args.draws)] for path, e in encoded.items()}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"fraction": args.fraction, "full": full, "draws": draws}, f, indent=1)
    if args.table:
        print("\n".join(choice_table(list(dict.fromkeys(args.runs)), full, draws)))
        return
    value = CANDIDATES[args.metric][1]
    print(
        f"| run | full eval | {args.draws} draws of {args.fraction:.0%} (+ few-shot seed): mean | sd | min "
        "| max |"
    )
    print("|---|---|---|---|---|---|")
    for path in dict.fromkeys(args.runs):
        print(row(path, value(full[path]), [value(m) for m in draws[path]]))
    for base, path in zip(args.runs[::2], args.runs[1::2], strict=False) if args.paired else ():
        diff = [value(b) - value(a) for a, b in zip(draws[base], draws[path], strict=True)]
        print(row(f"{path} − {base}, paired by draw", value(full[path]) - value(full[base]), diff, sign="+"))


if __name__ == "__main__":
    main()
