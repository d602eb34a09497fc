"""Study II (docs/studies/study2.md): JEST against static filtering and DRRho, on the natural pool and the
pool with half its captions swapped, with a weak and a strong reference. Train its steps, keep its logs.

Every training run is `configs/study2.py` (the shared learner and schedule, data in memory) plus the
overrides of its row in ``RUNS``, trained under runs/study2/NAME (weights stay there); its config.json and
metrics.jsonl are copied to results/study2/NAME when it finishes. Names read METHOD-POOL-REFERENCE-sSEED.

The two references (issue item 2), both the learner's architecture and schedule, so that they differ only in
what they saw:

- ``ref-weak``: trained on ``curated`` (6k pairs), as the first study's reference.
- ``ref-strong``: trained on the natural pool (60k pairs), the clean counterpart of the swapped pool (same
  images and keys, every caption its own), seed 1000 so that no IID learner seed is its twin. Chosen over a
  larger model on curated because the issue's probe measured it (3.4% swapped among easy-reference's picks
  against 35.5% for the weak one; JEST f = 0.8 at 6.6–6.9% held-out vs 6.2–6.3%), because it costs one learner
  run, and because "how good must the reference be" is then a question of its data alone, with the
  architecture fixed. It saw the natural pool's pairs: on the natural pool it is a reference that has seen
  the learner's data, on the swapped pool one trained on the clean version of it.

Each reference's embeddings are cached on both pools (`cache-reference`, sidecars named ``study2-weak`` /
``study2-strong`` beside the shards, as the first study's) and give the static filter's keep lists
(`jestclip filter --keep Q`, Q = 0.5 and 0.2, into runs/study2/keep/POOL-REFERENCE-qNN). Seeds as the issue
says: 3 for IID on both pools, and for JEST f = 0.8, DRRho and the static filter at ``SEEDED_FILTER_KEEP``
with the strong reference on both pools; 1 for every other run.

    python -m experiments.study2 --list                 # every step's name and exact command
    python -m experiments.study2 references             # both references, their caches and keep lists
    python -m experiments.study2 headline               # + IID and the strong reference's JEST, DRRho, filter
    python -m experiments.study2 jest-f08-swap50-weak-s0 iid-natural-s1
    python -m experiments.study2 --summary              # finished runs: final metric, precision, lift; the
                                                       # metric at an IID run's total FLOPs

Paths are relative to the checkout, as in experiments/study1.py: ``data/bench`` must be the built benchmark
(e.g. a link to /work/data/bench); the caches are written beside its pools' shards. A step runs the steps it
needs first. Finished steps are skipped (a run directory with model.pt, a cache whose
every shard has its header, a keep list with keep.json) and interrupted ones resume, so a command can be
repeated until it is done; run two at a time on the 2-core machine (`OMP_NUM_THREADS=1` each).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.steps import ROOT, Step, run, run_steps
from experiments.steps import train_step as _train_step

RECIPE = "configs/study2.py"
MODEL = "jest-micro"  # the recipe's model: the references' architecture, named to cache their embeddings
BENCH = "data/bench"
RUNS_DIR, RESULTS_DIR, KEEP_DIR = "runs/study2", "results/study2", "runs/study2/keep"
# The primary metric's key in an evaluation line, chosen before the study's runs (docs/studies/study2.md, "The
# metric, registered before the runs"); the paper-style average is the secondary one.
METRIC, SECONDARY = "eval/gallery_r5", "eval/average"
POOLS = {"natural": f"{BENCH}/pool", "swap50": f"{BENCH}/pool-swap50"}
REFERENCES = {"weak": ["data=data/bench/curated", "seed=0"], "strong": ["data=data/bench/pool", "seed=1000"]}
CACHE = {ref: f"study2-{ref}" for ref in REFERENCES}  # sidecar name of each reference's embeddings
FILTER_KEEP = (0.5, 0.2)  # Q: the share of the pool a static filter keeps
# The filter Q given 3 seeds (issue: "the better static filter"); set from the seed-0 runs of both Q.
SEEDED_FILTER_KEEP = 0.5
F = "filter_ratio=0.8"
# method label -> overrides (the reference's cache or keep list is added per run)
METHODS: dict[str, list[str]] = {
    "drrho": ["method.method=drrho"],
    "jest-f08": ["method.method=jest", F],
    "easy-reference-f08": ["method.method=jest", F, "method.scoring=easy_reference"],
    "independent-f08": ["method.method=independent", F],
    "flexi-jest-f08": ["method.method=flexi-jest", F, "method.approx=flexi", "method.approx_fraction=0.5"],
}


def train(name: str, overrides: list[str], needs: tuple[str, ...] = ()) -> Step:
    return _train_step(RECIPE, name, overrides, runs=RUNS_DIR, results=RESULTS_DIR, needs=needs)


def keep_name(pool: str, ref: str, q: float) -> str:
    return f"keep-{pool}-{ref}-q{round(100 * q):02d}"


def seeds(method: str, ref: str) -> range:
    """The issue's seeds: 3 for JEST, DRRho and the seeded filter with the strong reference; else 1."""
    seeded = {"jest-f08", "drrho", f"filter-q{round(100 * SEEDED_FILTER_KEEP):02d}"}
    return range(3 if ref == "strong" and method in seeded else 1)


def build_steps() -> dict[str, Step]:
    """Every step of the study by name, preparation first (references, caches, keep lists), then runs."""
    steps: dict[str, Step] = {}
    for ref, overrides in REFERENCES.items():
        steps[f"ref-{ref}"] = train(f"ref-{ref}", overrides)
    for ref in REFERENCES:
        for pool, path in POOLS.items():
            command = (
                "jestclip",
                "cache-reference",
                path,
                "--model",
                MODEL,
                "--checkpoint",
                f"{RUNS_DIR}/ref-{ref}/model.pt",
                "--name",
                CACHE[ref],
            )
            steps[f"cache-{ref}-{pool}"] = Step(command, (f"ref-{ref}",), cache=(path, CACHE[ref]))
            for q in FILTER_KEEP:
                out = f"{KEEP_DIR}/{pool}-{ref}-q{round(100 * q):02d}"
                command = ("jestclip", "filter", path, "--keep", str(q), "--out", out)
                command += ("--reference-cache", CACHE[ref])
                steps[keep_name(pool, ref, q)] = Step(command, (f"cache-{ref}-{pool}",), keep_list=out)
    for pool, path in POOLS.items():
        for seed in range(3):
            steps[f"iid-{pool}-s{seed}"] = train(f"iid-{pool}-s{seed}", [f"data={path}", f"seed={seed}"])
    for ref in ("strong", "weak"):
        for pool, path in POOLS.items():
            for q in FILTER_KEEP:
                method, keep = f"filter-q{round(100 * q):02d}", keep_name(pool, ref, q)
                overrides = ["method.method=filter", f"keep_list={steps[keep].keep_list}"]
                for seed in seeds(method, ref):
                    name = f"{method}-{pool}-{ref}-s{seed}"
                    steps[name] = train(name, [f"data={path}", *overrides, f"seed={seed}"], (keep,))
            for method, overrides in METHODS.items():
                for seed in seeds(method, ref):
                    name = f"{method}-{pool}-{ref}-s{seed}"
                    cache = [f"reference_cache={CACHE[ref]}"]
                    steps[name] = train(
                        name, [f"data={path}", *overrides, *cache, f"seed={seed}"], (f"cache-{ref}-{pool}",)
                    )
    return steps


STEPS = build_steps()
PREPARATION = [n for n in STEPS if n.startswith(("ref-", "cache-", "keep-"))]
TRAINING = [n for n in STEPS if STEPS[n].run_dir is not None and not n.startswith("ref-")]
HEADLINE = [  # IID and, with the strong reference, the seeded JEST, DRRho and filter runs
    n
    for n in TRAINING
    if n.startswith("iid-") or ("-strong-" in n and n.startswith(("jest-f08", "drrho", "filter")))
]
SETS = {
    "references": PREPARATION,
    "headline": HEADLINE,
    "strong": [n for n in TRAINING if "-strong-" in n or n.startswith("iid-")],
    "weak": [n for n in TRAINING if "-weak-" in n],
    "all": list(STEPS),
}


def _cell(mean: float | None, std: float | None, seeds: int, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "—"
    spread = f" ± {scale * std:.{digits}f}" if seeds > 1 and std is not None else ""
    return f"{scale * mean:.{digits}f}{spread}"


def summary(root: Path = ROOT) -> list[str]:
    """Markdown rows for the finished runs (results/study2), seeds of one configuration as one row: the final
    ``METRIC`` and ``SECONDARY`` (%, mean ± sd over seeds) and the learned-data precision and lift
    (jestclip.report)."""
    from jestclip.report import composition_table, group_seeds, load_run

    done = [n for n in STEPS if (root / RESULTS_DIR / n / "metrics.jsonl").exists()]
    runs = {n: load_run(root / RESULTS_DIR / n) for n in done}
    # a reference is its own row: the strong one is an IID run of the natural pool but for its seed, and
    # must not be counted as a seed of the study's IID runs
    groups = [g for n in done if n.startswith("ref-") for g in group_seeds([runs[n]])]
    groups += group_seeds([run for n, run in runs.items() if not n.startswith("ref-")])
    composition = {row.run: row for row in composition_table(groups)}
    lines = [
        f"| run | seeds | final {METRIC} (%) | final {SECONDARY} (%) | precision (%) | lift | "
        "precision, last quarter (%) | lift, last quarter | swapped among learned (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in groups:
        finals = []
        for metric in (METRIC, SECONDARY):
            evaluated = [r for r in group.runs if r.evals and metric in r.evals[-1]]
            whole = len(evaluated) == len(group.runs)
            finals.append(_cell(*group.final(metric), len(group.runs), 100) if whole else "—")
        final = " | ".join(finals)
        row = composition.get(group.name)
        cells = ["—"] * 5
        if row is not None:
            cells = [
                _cell(row.mean[key], row.std[key], row.seeds, *scale)
                for key, scale in (
                    ("precision", (100, 1)),
                    ("lift", (1, 3)),
                    ("precision_last_quarter", (100, 1)),
                    ("lift_last_quarter", (1, 3)),
                )
            ]
            offered = row.mean.get("candidates_swapped")  # 0 on a pool without swapped pairs
            swapped = _cell(row.mean["learned_swapped"], row.std["learned_swapped"], row.seeds, 100, 1)
            cells.append(swapped if offered else "—")
        lines.append(f"| {group.name} | {len(group.runs)} | {final} | " + " | ".join(cells) + " |")
    return lines


def equal_flops(root: Path = ROOT) -> list[str]:
    """Markdown rows: every finished seed group's ``METRIC`` (%, mean ± sd over seeds) at the per-step FLOPs
    an IID run spends in all (its final ``flops_total``; the same for the filter and DRRho, whose steps cost
    IID's), and the step at which a costlier method (JEST's family) spent them. The reference's own cost is
    left out: runs compared here share their reference, so it is the same for each."""
    from jestclip.report import group_seeds, load_run
    from jestclip.report.compare import at_flops

    done = [n for n in TRAINING if (root / RESULTS_DIR / n / "metrics.jsonl").exists()]
    groups = group_seeds([load_run(root / RESULTS_DIR / n) for n in done])
    iid = [float(r.evals[-1]["flops_total"]) for g in groups if g.method == "iid" for r in g.runs if r.evals]
    if not iid:
        return []
    budget = statistics.fmean(iid)
    lines = [
        f"| run | seeds | {METRIC} (%) at {budget:.3g} FLOPs | at step |",
        "|---|---:|---:|---:|",
    ]
    for group in groups:
        found = [at_flops(r, budget, METRIC) for r in group.runs]
        if any(f is None for f in found):
            lines.append(f"| {group.name} | {len(group.runs)} | not reached | — |")
            continue
        values = [100 * f[0] for f in found]
        sd = statistics.stdev(values) if len(values) > 1 else None
        step = statistics.fmean(f[1] for f in found)
        lines.append(
            f"| {group.name} | {len(group.runs)} | {_cell(statistics.fmean(values), sd, len(values))} "
            f"| {step:,.0f} |"
        )
    return lines


def report_commands(root: Path = ROOT) -> list[list[str]]:
    """One `jestclip report` per pool and reference over the finished runs (results/study2): IID of that
    pool and every run with that reference, compared on ``METRIC``, the reference's own cost beside the runs';
    none for a pool and reference without a finished IID run and another finished run. Written into
    results/study2/report-POOL-REFERENCE (no selection diagnostics: they need the weights)."""
    commands = []
    for pool in POOLS:
        for ref in REFERENCES:
            names = [n for n in TRAINING if n.startswith(f"iid-{pool}-") or f"-{pool}-{ref}-" in n]
            done = [n for n in names if (root / RESULTS_DIR / n / "metrics.jsonl").exists()]
            if len(done) < 2 or not any(n.startswith("iid-") for n in done):
                continue
            commands.append(
                [
                    "jestclip",
                    "report",
                    *(f"{RESULTS_DIR}/{n}" for n in done),
                    "--metric",
                    METRIC,
                    "--reference-run",
                    f"{RESULTS_DIR}/ref-{ref}",
                    "--no-diagnostics",
                    "--out",
                    f"{RESULTS_DIR}/report-{pool}-{ref}",
                ]
            )
    return commands


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", default=["references"], help=f"step names or {sorted(SETS)}")
    parser.add_argument("--list", action="store_true", help="print every step's command and exit")
    parser.add_argument("--summary", action="store_true", help="final metric, precision and lift of runs")
    parser.add_argument(
        "--report",
        action="store_true",
        help="a `jestclip report` per pool and reference of the finished runs",
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, step in STEPS.items():
            print(f"{name:32s} {' '.join(step.command)}")
        return
    if args.summary:
        print("\n".join([*summary(), "", *equal_flops()]))
        return
    if args.report:
        for command in report_commands():
            run(command)
        return
    names = [n for item in args.steps for n in SETS.get(item, [item])]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        raise SystemExit(f"study2: unknown step(s) {unknown}; see --list, or one of {sorted(SETS)}")
    run_steps(STEPS, names)


if __name__ == "__main__":
    main()
