"""Study I, the evidence study (docs/studies/study1.md): train its runs, keep their logs in results/,
write the report.

Every run is `configs/study.py` plus the overrides below, trained under runs/study/NAME (weights stay there)
with its config.json and metrics.jsonl copied to results/study/NAME when it finishes. The reference is the
study's IID learner trained on `curated` (run `reference`, which is also "IID on curated, seed 0"); its
embeddings of the pool are cached as `study-reference` before any run that scores with it.

    python -m experiments.study1 headline            # IID and JEST f = 0.8, seed 0 (+ the reference, cache)
    python -m experiments.study1 all                 # every run, then results/study/report
    python -m experiments.study1 jest-f09 hard-learner
    python -m experiments.study1 --list              # names and the exact command of each run
    python -m experiments.study1 --summary           # finished runs: final and late-run averages vs IID

Finished runs are skipped and interrupted ones resume, so the command can be repeated until it is done.
"""

from __future__ import annotations

import argparse
import statistics

from experiments.steps import ROOT, copy_logs, run

RECIPE = "configs/study.py"
CACHE = "study-reference"
JEST = ["method.method=jest", f"reference_cache={CACHE}"]

# run name -> overrides of configs/study.py (run_dir and seed are added from the name)
RUNS: dict[str, list[str]] = {
    "reference": ["data=data/bench/curated"],
    **{f"iid-s{s}": [] for s in range(3)},
    **{f"jest-f08-s{s}": [*JEST, "filter_ratio=0.8"] for s in range(3)},
    "jest-f05-s0": [*JEST, "filter_ratio=0.5"],
    "jest-f09-s0": [*JEST, "filter_ratio=0.9"],
    **{
        f"easy-reference-f08-s{s}": [*JEST, "filter_ratio=0.8", "method.scoring=easy_reference"]
        for s in range(3)
    },
    "hard-learner-f08-s0": [*JEST, "filter_ratio=0.8", "method.scoring=hard_learner"],
    "independent-f08-s0": ["method.method=independent", f"reference_cache={CACHE}", "filter_ratio=0.8"],
    "independent-f09-s0": ["method.method=independent", f"reference_cache={CACHE}", "filter_ratio=0.9"],
    **{
        f"flexi-jest-f08-s{s}": [
            "method.method=flexi-jest",
            f"reference_cache={CACHE}",
            "filter_ratio=0.8",
            "method.approx=flexi",
            "method.approx_fraction=0.5",
        ]
        for s in range(3)
    },
}
SETS = {"headline": ["reference", "iid-s0", "jest-f08-s0"], "all": list(RUNS)}
NEEDS_CACHE = {name for name, overrides in RUNS.items() if f"reference_cache={CACHE}" in overrides}


def command(name: str) -> list[str]:
    """The exact `jestclip train` command of run ``name``."""
    seed = name.rsplit("-s", 1)[1] if "-s" in name else "0"
    return ["jestclip", "train", RECIPE, *RUNS[name], f"seed={seed}", f"run_dir=runs/study/{name}"]


def cache_command() -> list[str]:
    return [
        "jestclip",
        "cache-reference",
        "data/bench/pool",
        "--model",
        "jest-micro",
        "--checkpoint",
        "runs/study/reference/model.pt",
        "--name",
        CACHE,
    ]


def report_command() -> list[str]:
    """The `jestclip report` of the whole study (docs/studies/study1.md quotes it)."""
    logs = [f"results/study/{name}" for name in RUNS if name != "reference"] + ["results/study/reference"]
    return [
        "jestclip",
        "report",
        *logs,
        "--baseline",
        "iid",
        "--reference-run",
        "results/study/reference",
        "--diagnostics-run",
        "runs/study/jest-f08-s0",
        "--out",
        "results/study/report",
    ]


def keep_logs(name: str, runs: str = "runs/study", results: str = "results/study") -> None:
    """Copy a finished run's logs from RUNS/NAME to RESULTS/NAME."""
    copy_logs(f"{runs}/{name}", f"{results}/{name}")


LATE = 2000  # the "late-run" average: mean of the evaluations at steps >= LATE (the last five)


def curve(name: str) -> dict[int, float]:
    """step -> held-out average (%) of a finished run, from results/."""
    from jestclip.report import AVERAGE, load_run

    return {
        int(e["step"]): 100 * float(e[AVERAGE]) for e in load_run(ROOT / "results" / "study" / name).evals
    }


def late_average(name: str) -> tuple[float, float]:
    """(final, mean of the evaluations at steps >= LATE) of the held-out average, in %, from results/."""
    points = curve(name)
    return points[max(points)], statistics.fmean(v for step, v in points.items() if step >= LATE)


def summary() -> None:
    """Per finished run: final and late-run average, and its difference from IID of the same seed."""
    done = [n for n in RUNS if (ROOT / "results" / "study" / n / "metrics.jsonl").exists()]
    values = {n: late_average(n) for n in done}
    print(
        f"| run | final (%) | mean of evaluations at steps >= {LATE:,} (%) | − IID same seed: final | late |"
    )
    print("|---|---|---|---|---|")
    for name in done:
        final, late = values[name]
        seed = name.rsplit("-s", 1)[1] if "-s" in name else "0"
        iid = values.get(f"iid-s{seed}")
        diff = (
            "| | |"
            if iid is None or name.startswith("iid")
            else f"| {final - iid[0]:+.2f} | {late - iid[1]:+.2f} |"
        )
        print(f"| {name} | {final:.2f} | {late:.2f} {diff}")


def paired_curves(group: str = "jest-f08") -> None:
    """The seeds of ``group`` minus IID of the same seed at every evaluation: mean, and seeds ahead."""
    seeds = [n.rsplit("-s", 1)[1] for n in RUNS if n.startswith(f"{group}-s")]
    pairs = [
        (curve(f"{group}-s{s}"), curve(f"iid-s{s}"))
        for s in seeds
        if (ROOT / "results" / "study" / f"{group}-s{s}" / "metrics.jsonl").exists()
    ]
    if not pairs:
        return
    steps = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
    diffs = {t: [a[t] - b[t] for a, b in pairs] for t in steps}
    print(f"\n{group} minus IID of the same seed (points), {len(pairs)} seeds:\n")
    print("| | " + " | ".join(f"{t:,}" for t in steps) + " |")
    print("|---|" + "---|" * len(steps))
    print("| mean | " + " | ".join(f"{statistics.fmean(diffs[t]):+.2f}" for t in steps) + " |")
    print(
        "| seeds ahead | " + " | ".join(f"{sum(d > 0 for d in diffs[t])}/{len(pairs)}" for t in steps) + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=["headline"], help=f"run names or {sorted(SETS)}")
    parser.add_argument("--list", action="store_true", help="print every run's command and exit")
    parser.add_argument("--summary", action="store_true", help="final and late-run averages of finished runs")
    args = parser.parse_args()
    if args.list:
        for name in RUNS:
            print(f"{name:24s} {' '.join(command(name))}")
        return
    if args.summary:
        summary()
        for group in ("jest-f08", "flexi-jest-f08", "easy-reference-f08"):
            paired_curves(group)
        return
    names = [n for item in args.runs for n in SETS.get(item, [item])]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"study: unknown run(s) {unknown}; known: {list(RUNS)} or {sorted(SETS)}")
    if set(names) & NEEDS_CACHE and "reference" not in names:
        names.insert(0, "reference")
    for name in dict.fromkeys(names):
        if not (ROOT / "runs" / "study" / name / "model.pt").exists():
            run(command(name))
        keep_logs(name)
        if name == "reference":
            run(cache_command())  # reuses every sidecar already cached by these weights
    if "all" in args.runs:
        run(report_command())


if __name__ == "__main__":
    main()
