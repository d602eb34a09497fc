"""IID vs JEST at the demo's settings, over several seeds: final average accuracy and speed-up to target.

Needs a finished ``jestclip demo`` (its benchmark subset, reference and cached embeddings). Seed 0 is the
demo's own pair of runs; other seeds train under ``OUT/seed<N>/``. Prints a markdown table.

    python -m experiments.demo_seeds --out runs/demo --data data/bench-demo --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from jestclip.demo import DemoConfig, run_config
from jestclip.report import load_run, speedup_table
from jestclip.train.loop import train
from jestclip.train.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default="data/bench-demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    base = DemoConfig(out=args.out, data=args.data)
    rows = []
    for seed in args.seeds:
        cfg = dataclasses.replace(base, seed=seed, out=args.out if seed == 0 else f"{args.out}/seed{seed}")
        runs = {}
        for method in ("iid", "jest"):
            run = run_config(cfg, method, method)
            if not RunDir(run.run_dir).finished:
                train(run)
            runs[method] = load_run(run.run_dir)
        _, (iid, jest) = speedup_table([runs["iid"], runs["jest"]], runs["iid"])
        rows.append((seed, iid.final, jest.final, jest.examples_speedup, jest.flops_speedup))

    def fmt(x: float | None, spec: str) -> str:
        return "not reached" if x is None else format(x, spec)

    print("| seed | IID final (%) | JEST final (%) | JEST speed-up, examples | JEST speed-up, FLOPs |")
    print("|---:|---:|---:|---:|---:|")
    for seed, iid_final, jest_final, ex, fl in rows:
        print(
            f"| {seed} | {100 * iid_final:.2f} | {100 * jest_final:.2f} | {fmt(ex, '.2f')} | "
            f"{fmt(fl, '.2f')} |"
        )
    if len(rows) > 1:
        iids, jests = [100 * r[1] for r in rows], [100 * r[2] for r in rows]
        print(
            f"| mean ± sd | {statistics.mean(iids):.2f} ± {statistics.stdev(iids):.2f} | "
            f"{statistics.mean(jests):.2f} ± {statistics.stdev(jests):.2f} | | |"
        )


if __name__ == "__main__":
    main()
