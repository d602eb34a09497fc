"""Study III (docs/studies/study3.md): does any compute-matched JEST beat filtering the pool once?

Every run is `configs/study2.py` (Study II's regime: `jest-micro`, 32 px, b = 64, data in memory) plus the
overrides of its step, with Study II's strong reference (its cache ``study2-strong`` and its Q = 0.5 keep
lists, made by Study II's preparation steps, repeated here under their Study II names). A run *scheduled for
IID's FLOPs* sets ``steps`` to the most steps whose per-step FLOPs sum to at most IID's total over 3,000 steps
(``jestclip.train.startup.scheduled_steps``), so its learning-rate schedule completes there.

    python -m experiments.study3 --list              # every step's name and exact command
    python -m experiments.study3 prep                # the reference, its caches and keep lists
    python -m experiments.study3 matched             # JEST and Flexi-JEST at IID's FLOPs, seeds 0-2
    python -m experiments.study3 pilot               # the three schedule forms, seed 5, swapped pool
    python -m experiments.study3 jest-f08-iidflops-swap50-s1 iid-natural-s3
    python -m experiments.study3 --summary           # the tables of docs/studies/study3.md

Training runs go to runs/study3/NAME (Study II's rows to runs/study2/NAME) and their logs to results/.
Finished steps are skipped and interrupted ones resume; run two at a time on the 2-core machine
(OMP_NUM_THREADS=1 each). Names read METHOD-POOL-sSEED.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

from experiments.steps import ROOT, Step, run_steps, train_step

RECIPE = "configs/study2.py"
MODEL = "jest-micro"
POOLS = {"natural": "data/bench/pool", "swap50": "data/bench/pool-swap50"}
CACHE = "study2-strong"  # Study II's strong reference's embeddings, beside the pools' shards
WEAK = "study2-weak"  # and its weak reference's (trained on curated only)
RUNS, RESULTS = "runs/study3", "results/study3"
STUDY2_RUNS, STUDY2_RESULTS = "runs/study2", "results/study2"
METRIC, SECONDARY = "eval/gallery_r5", "eval/average"
IID_STEPS = 3000  # the budget: what an IID run of the recipe spends
PARTWAY_STEPS = 4000  # the addendum's longer IID runs, read at IID_STEPS (docs/studies/study3.md)
MAIN_SEEDS, DECISIVE_SEEDS, PILOT_SEED = (0, 1, 2), (3, 4), 5
ALL_SEEDS = (*MAIN_SEEDS, *DECISIVE_SEEDS)

JEST = ("method.method=jest", "filter_ratio=0.8", f"reference_cache={CACHE}")
FLEXI = (
    "method.method=flexi-jest",
    "filter_ratio=0.8",
    "method.approx=flexi",
    "method.approx_fraction=0.5",
    f"reference_cache={CACHE}",
)


def keep_list(pool: str) -> str:
    """Study II's Q = 0.5 keep list of the strong reference on ``pool``."""
    return f"{STUDY2_RUNS}/keep/{pool}-strong-q50"


# Compute-matched methods: name -> overrides for a pool (every one scheduled for IID's FLOPs)
MATCHED: dict[str, tuple[str, ...]] = {
    "jest-f08-iidflops": JEST,
    "flexi-jest-f08-iidflops": FLEXI,
}
# The pilot's selection schedules (docs/studies/study3.md, "Pilot"): name -> overrides, {pool} filled in
PILOT: dict[str, tuple[str, ...]] = {
    "jest-first25": (*JEST, "method.schedule.end=0.25"),
    "jest-anneal": (*JEST, "method.schedule.final_filter_ratio=0.0"),
    "flexi-jest-keep50": (*FLEXI, "keep_list={keep}"),
}
# Set from the results, each with its date (docs/studies/study3.md says why): the pilot's winner, run at the
# main seeds on both pools, and the best compute-matched method by the 3-seed results, given seeds 3 and 4.
# 2026-12-07, 09:37 UTC, the pilot's final gallery R@5 (seed 5, swapped pool): jest-first25 15.15,
# jest-anneal 15.73, flexi-jest-keep50 17.74 (results/study3/*-swap50-s5)
CHOSEN: str | None = "flexi-jest-keep50"
# 2026-12-07, 13:08 UTC, best_candidate over seeds 0-2 (mean over the two pools of each pool's 3-seed mean of
# final gallery R@5): flexi-jest-f08-iidflops 18.30, flexi-jest-keep50 16.99, jest-f08-iidflops 15.60
BEST: str | None = "flexi-jest-f08-iidflops"


@functools.cache
def budget() -> float:
    """IID's total per-step FLOPs over ``IID_STEPS`` steps of the recipe."""
    from jestclip.train.config import apply_overrides, load_recipe
    from jestclip.train.startup import StepCosts

    cfg = apply_overrides(load_recipe(ROOT / RECIPE), [f"steps={IID_STEPS}"])
    return IID_STEPS * StepCosts.measure(cfg).total(cfg.method.batch_size)


@functools.cache
def matched_steps(overrides: tuple[str, ...]) -> int:
    """The steps of the recipe with ``overrides`` scheduled for ``budget()``."""
    from jestclip.train.config import apply_overrides, load_recipe
    from jestclip.train.startup import scheduled_steps

    cfg = apply_overrides(
        load_recipe(ROOT / RECIPE), [o for o in overrides if not o.startswith("keep_list=")]
    )
    return scheduled_steps(cfg, budget())


def _filled(overrides: tuple[str, ...], pool: str) -> tuple[str, ...]:
    return tuple(o.format(keep=keep_list(pool)) for o in overrides)


def _matched(name: str, overrides: tuple[str, ...], pool: str, seed: int) -> Step:
    filled = _filled(overrides, pool)
    needs = [f"cache-{pool}"] + ([f"keep-{pool}"] if any(o.startswith("keep_list=") for o in filled) else [])
    return train_step(
        RECIPE,
        f"{name}-{pool}-s{seed}",
        [f"data={POOLS[pool]}", *filled, f"steps={matched_steps(overrides)}", f"seed={seed}"],
        runs=RUNS,
        results=RESULTS,
        needs=needs,
    )


def build_steps() -> dict[str, Step]:
    """Every step by name: preparation, then the runs (see the module docstring)."""
    steps: dict[str, Step] = {}
    steps["ref-strong"] = train_step(
        RECIPE,
        "ref-strong",
        ["data=data/bench/pool", "seed=1000"],
        runs=STUDY2_RUNS,
        results=STUDY2_RESULTS,
    )
    for pool, path in POOLS.items():
        checkpoint = f"{STUDY2_RUNS}/ref-strong/model.pt"
        command = ("jestclip", "cache-reference", path, "--model", MODEL, "--checkpoint", checkpoint)
        steps[f"cache-{pool}"] = Step((*command, "--name", CACHE), ("ref-strong",), cache=(path, CACHE))
        command = ("jestclip", "filter", path, "--keep", "0.5", "--out", keep_list(pool))
        steps[f"keep-{pool}"] = Step(
            (*command, "--reference-cache", CACHE), (f"cache-{pool}",), keep_list=keep_list(pool)
        )
    for pool, path in POOLS.items():
        # every seed here: the reference retrained here is not bitwise Study II's (docs/studies/study3.md)
        for seed in (*MAIN_SEEDS, *DECISIVE_SEEDS):
            iid = [f"data={path}", f"seed={seed}"]
            steps[f"iid-{pool}-s{seed}"] = train_step(
                RECIPE, f"iid-{pool}-s{seed}", iid, runs=RUNS, results=RESULTS
            )
            if seed in MAIN_SEEDS:  # the addendum: IID on a longer cosine, read part-way at its budget
                name = f"iid-{PARTWAY_STEPS}steps-{pool}-s{seed}"
                longer = [*iid[:1], f"steps={PARTWAY_STEPS}", *iid[1:]]
                steps[name] = train_step(RECIPE, name, longer, runs=RUNS, results=RESULTS)
            name = f"filter-q50-{pool}-s{seed}"
            overrides = [
                f"data={path}",
                "method.method=filter",
                f"keep_list={keep_list(pool)}",
                f"seed={seed}",
            ]
            steps[name] = train_step(
                RECIPE, name, overrides, runs=RUNS, results=RESULTS, needs=[f"keep-{pool}"]
            )
        for name, overrides in MATCHED.items():
            for seed in MAIN_SEEDS:
                steps[f"{name}-{pool}-s{seed}"] = _matched(name, overrides, pool, seed)
        for seed in (1, 2):  # Study II's full-length Flexi-JEST row, completed
            name = f"flexi-jest-f08-{pool}-strong-s{seed}"
            overrides = [f"data={path}", *FLEXI, f"seed={seed}"]
            steps[name] = train_step(
                RECIPE, name, overrides, runs=STUDY2_RUNS, results=STUDY2_RESULTS, needs=[f"cache-{pool}"]
            )
    # if time allows (Study II's open question): the weak reference, its caches, DRRho with it, seeds 1-2
    steps["ref-weak"] = train_step(
        RECIPE, "ref-weak", ["data=data/bench/curated", "seed=0"], runs=STUDY2_RUNS, results=STUDY2_RESULTS
    )
    for pool, path in POOLS.items():
        checkpoint = f"{STUDY2_RUNS}/ref-weak/model.pt"
        command = ("jestclip", "cache-reference", path, "--model", MODEL, "--checkpoint", checkpoint)
        steps[f"cache-weak-{pool}"] = Step((*command, "--name", WEAK), ("ref-weak",), cache=(path, WEAK))
        for seed in (1, 2):
            name = f"drrho-{pool}-weak-s{seed}"
            overrides = [f"data={path}", "method.method=drrho", f"reference_cache={WEAK}", f"seed={seed}"]
            steps[name] = train_step(
                RECIPE,
                name,
                overrides,
                runs=STUDY2_RUNS,
                results=STUDY2_RESULTS,
                needs=[f"cache-weak-{pool}"],
            )
    for name, overrides in PILOT.items():
        steps[f"{name}-swap50-s{PILOT_SEED}"] = _matched(name, overrides, "swap50", PILOT_SEED)
    if CHOSEN is not None:
        for pool in POOLS:
            for seed in MAIN_SEEDS:
                steps[f"{CHOSEN}-{pool}-s{seed}"] = _matched(CHOSEN, PILOT[CHOSEN], pool, seed)
    # seeds 3-4 of every candidate of the decisive comparison are defined, so that the likely one may start
    # before the last seed-0-2 run ends; BEST (chosen from seeds 0-2 alone, best_candidate) is the one that
    # decides, and any other that ran is reported beside it
    for name in [*MATCHED, *([CHOSEN] if CHOSEN else [])]:
        for pool in POOLS:
            for seed in DECISIVE_SEEDS:
                steps[f"{name}-{pool}-s{seed}"] = _matched(name, {**MATCHED, **PILOT}[name], pool, seed)
    return steps


@functools.cache
def steps() -> dict[str, Step]:
    return build_steps()


def sets() -> dict[str, list[str]]:
    names = list(steps())
    return {
        "prep": [n for n in names if n.startswith(("ref-strong", "cache-natural", "cache-swap50", "keep-"))],
        "weak": [n for n in names if "weak" in n],
        "matched": [n for n in names if n.startswith(tuple(MATCHED)) and n.endswith(("-s0", "-s1", "-s2"))],
        "study2-flexi": [n for n in names if n.startswith("flexi-jest-f08-") and "-strong-" in n],
        "pilot": [n for n in names if n.endswith(f"-s{PILOT_SEED}")],
        "chosen": [n for n in names if CHOSEN and n.startswith(CHOSEN) and n.endswith(("-s0", "-s1", "-s2"))],
        "baselines": [
            n
            for n in names
            if n.startswith(("iid-natural", "iid-swap50", "filter-q50-")) and not n.endswith(("-s3", "-s4"))
        ],
        "partway": [n for n in names if n.startswith(f"iid-{PARTWAY_STEPS}steps-")],
        "decisive": [
            n
            for n in names
            if n.endswith(("-s3", "-s4")) and n.startswith(("iid-", "filter-q50-", *([BEST] if BEST else [])))
        ],
    }


# --- the analysis: docs/studies/study3.md's tables ----------------------------------------------------------


def group_dirs(root: Path = ROOT, seeds: tuple[int, ...] = MAIN_SEEDS) -> dict[str, dict[str, list[Path]]]:
    """pool -> group name -> the finished runs' result directories among ``seeds`` (the pilots: seed 5)."""
    out: dict[str, dict[str, list[Path]]] = {}
    for pool in POOLS:
        groups: dict[str, list[Path]] = {}
        groups["iid"] = [root / RESULTS / f"iid-{pool}-s{s}" for s in seeds]
        groups["filter-q50"] = [root / RESULTS / f"filter-q50-{pool}-s{s}" for s in seeds]
        for name in [*MATCHED, *PILOT]:
            groups[name] = [root / RESULTS / f"{name}-{pool}-s{s}" for s in seeds]
            groups[f"{name} (pilot)"] = [root / RESULTS / f"{name}-{pool}-s{PILOT_SEED}"]
        groups["flexi-jest-f08 (3,000 steps)"] = [
            root / STUDY2_RESULTS / f"flexi-jest-f08-{pool}-strong-s{s}" for s in seeds if s in MAIN_SEEDS
        ]
        groups["drrho, weak reference (Study II)"] = [
            root / STUDY2_RESULTS / f"drrho-{pool}-weak-s{s}" for s in seeds if s in MAIN_SEEDS
        ]
        finished = {k: [p for p in v if (p / "metrics.jsonl").exists()] for k, v in groups.items()}
        out[pool] = {k: v for k, v in finished.items() if v}
    return out


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _seed(path: Path) -> str:
    return path.name.rsplit("-s", 1)[1]


def final_values(root: Path = ROOT, seeds: tuple[int, ...] = MAIN_SEEDS) -> dict[str, dict[str, list[float]]]:
    """pool -> group -> the final ``METRIC`` (%) of each finished run among ``seeds``."""
    from jestclip.report import load_run

    return {
        pool: {
            name: [100 * float(load_run(p).final_eval[METRIC]) for p in paths]
            for name, paths in groups.items()
        }
        for pool, groups in group_dirs(root, seeds).items()
    }


def best_candidate(root: Path = ROOT) -> tuple[str | None, dict[str, float], list[str]]:
    """The registered choice of the decisive comparison's method: among the compute-matched methods and the
    chosen schedule, the one with the highest mean over the two pools of its seed-0-2 means. Returns (the
    method or None while a run is missing, each candidate's mean of pool means, the missing runs)."""
    finals = final_values(root, MAIN_SEEDS)
    candidates = [*MATCHED, *([CHOSEN] if CHOSEN else [])]
    missing = [
        f"{name}-{pool}-s{seed}"
        for name in candidates
        for pool in POOLS
        for seed in MAIN_SEEDS
        if not (root / RESULTS / f"{name}-{pool}-s{seed}" / "metrics.jsonl").exists()
    ]
    means = {
        name: statistics.fmean(statistics.fmean(finals[pool][name]) for pool in POOLS)
        for name in candidates
        if all(name in finals[pool] for pool in POOLS)
    }
    best = max(means, key=means.__getitem__) if means and not missing else None
    return best, means, missing


def reference_share(root: Path = ROOT) -> str:
    """The strong reference's own cost (its training run's logged FLOPs and one forward per pair of both
    pools) amortised over every learner run of Studies II and III that used it (the pre-registration's
    secondary reading); IID uses none."""
    from jestclip.report.reference import reference_cost

    cost = reference_cost(root / RESULTS / "ref-strong", [root / p for p in POOLS.values()])
    study2 = [p for p in (root / STUDY2_RESULTS).glob("*-strong-s[0-9]") if (p / "metrics.jsonl").exists()]
    study3 = [
        p
        for p in (root / RESULTS).glob("*-s[0-9]")
        if (p / "metrics.jsonl").exists() and not p.name.startswith("iid-")
    ]
    share = cost.total / (len(study2) + len(study3))
    return (
        f"The strong reference's own cost: training {cost.train_flops:.4g} FLOPs, caching both pools "
        f"({cost.cached_samples:,} pairs) {cost.cache_flops:.4g}; amortised over the {len(study2)} Study II "
        f"and {len(study3)} Study III learner runs that used it: {share:.3g} FLOPs a run, "
        f"{100 * share / budget():.1f}% of IID's budget, added to every run but IID's."
    )


def cpu_hours(root: Path = ROOT) -> tuple[int, float]:
    """The study's learner runs (results/study3) and their logged training wall time in hours, one thread
    each (a run's last ``wall_s``; runs paused or restarted count the pause)."""
    from jestclip.report import load_run

    paths = [p for p in sorted((root / RESULTS).glob("*-s[0-9]")) if (p / "metrics.jsonl").exists()]
    walls = [float(load_run(p).train[-1]["wall_s"]) for p in paths]
    return len(paths), sum(walls) / 3600


def summary(
    root: Path = ROOT, seeds: tuple[int, ...] = MAIN_SEEDS, only: tuple[str, ...] | None = None
) -> list[str]:
    """Markdown: per pool, every finished group's (or those in ``only``) final metrics (%) over ``seeds``, its
    verdict against the filter and against IID under the pre-registered rule, its steps and FLOPs, and what it
    learned on."""
    from jestclip.report import composition_table, load_run
    from jestclip.report.compare import verdict
    from jestclip.report.groups import RunGroup

    lines = []
    for pool, groups in group_dirs(root, seeds).items():
        groups = {k: v for k, v in groups.items() if only is None or k in only}
        runs = {name: [load_run(p) for p in paths] for name, paths in groups.items()}
        finals = {name: [100 * float(r.final_eval[METRIC]) for r in rs] for name, rs in runs.items()}
        rows = composition_table([RunGroup(name, tuple(rs)) for name, rs in runs.items()])
        composition = {row.run: row for row in rows}
        lines += [
            f"**{pool} pool** (`{POOLS[pool]}`)",
            "",
            f"| run | seeds | steps | total FLOPs | final {METRIC} (%) | vs filter | vs IID | "
            f"final {SECONDARY} (%) | precision (%) | lift | swapped among learned (%) |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        for name, rs in runs.items():
            steps_ = statistics.fmean(int(r.evals[-1]["step"]) for r in rs)
            flops = statistics.fmean(float(r.evals[-1]["flops_total"]) for r in rs)
            secondary = [100 * float(r.final_eval[SECONDARY]) for r in rs]
            against = [
                str(verdict(finals[name], finals[other])) if other in finals and other != name else "—"
                for other in ("filter-q50", "iid")
            ]
            row = composition.get(name)
            cells = ["—", "—", "—"]
            if row is not None:
                swapped = row.mean.get("learned_swapped") if row.mean.get("candidates_swapped") else None
                cells = [
                    f"{100 * row.mean['precision']:.1f}",
                    f"{row.mean['lift']:.3f}",
                    "—" if swapped is None else f"{100 * swapped:.1f}",
                ]
            lines.append(
                f"| {name} | {','.join(_seed(p) for p in groups[name])} | {steps_:,.0f} | {flops:.4g} | "
                f"{_cell(finals[name])} | "
                f"{against[0]} | {against[1]} | {_cell(secondary)} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return lines


def at_iid_flops(root: Path = ROOT) -> list[str]:
    """Markdown: the full-length Flexi-JEST and JEST (Study II) read at IID's FLOPs part-way down their
    schedules (Study II's reading), and the addendum's longer IID runs read there too."""
    from jestclip.report import load_run
    from jestclip.report.compare import at_flops

    lines = [
        f"| pool | run | seeds | {METRIC} (%) at {budget():.4g} FLOPs | at step |",
        "|---|---|---:|---:|---:|",
    ]
    for pool in POOLS:
        full = f"({IID_STEPS:,} steps)"
        longer = {
            f"JEST f = 0.8 {full}": f"{STUDY2_RESULTS}/jest-f08-{pool}-strong-s{{}}",
            f"Flexi-JEST f = 0.8 {full}": f"{STUDY2_RESULTS}/flexi-jest-f08-{pool}-strong-s{{}}",
            f"IID ({PARTWAY_STEPS:,} steps)": f"{RESULTS}/iid-{PARTWAY_STEPS}steps-{pool}-s{{}}",
        }
        for label, pattern in longer.items():
            paths = [root / pattern.format(s) for s in MAIN_SEEDS]
            found = [at_flops(load_run(p), budget(), METRIC) for p in paths if (p / "metrics.jsonl").exists()]
            if not found or any(f is None for f in found):
                continue
            values = [100 * f[0] for f in found]
            step = statistics.fmean(f[1] for f in found)
            lines.append(f"| {pool} | {label} | {len(values)} | {_cell(values)} | {step:,.0f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", default=["prep"], help="step names or sets: " + ", ".join(sets()))
    parser.add_argument("--list", action="store_true", help="print every step's command and exit")
    parser.add_argument("--summary", action="store_true", help="the study's tables over the finished runs")
    args = parser.parse_args(argv)
    if args.list:
        for name, step in steps().items():
            print(f"{name:40s} {' '.join(step.command)}")
        return
    if args.summary:
        best, means, missing = best_candidate()
        said = ", ".join(f"{n} {m:.2f}" for n, m in sorted(means.items(), key=lambda kv: -kv[1]))
        runs, hours = cpu_hours()
        decisive = ("iid", "filter-q50", *([BEST] if BEST else []))
        print("\n".join(["### Seeds 0-2 (provisional verdicts)", "", *summary(), *at_iid_flops(), ""]))
        print(f"Best compute-matched method by the registered rule (mean of pool means, seeds 0-2): {said}")
        print(f"-> {best}" if best else f"-> not yet: {len(missing)} run(s) missing ({', '.join(missing)})")
        print("", reference_share())
        print(
            "",
            "### Seeds 0-4 (the decisive comparison)",
            "",
            *summary(seeds=ALL_SEEDS, only=decisive),
            sep="\n",
        )
        print(
            f"{runs} learner runs in {RESULTS}: {hours:.1f} h of logged training wall time, one thread each"
        )
        return
    names = [n for item in args.steps for n in sets().get(item, [item])]
    unknown = sorted(set(names) - set(steps()))
    if unknown:
        raise SystemExit(f"study3: unknown step(s) {unknown}; see --list, or one of {sorted(sets())}")
    run_steps(steps(), names)


if __name__ == "__main__":
    main()
