"""Study II (docs/studies/study2.md): the learner and schedule every run of the study shares.

The first study's regime (configs/study.py: `jest-micro` at 32 px, b = 64, 3,000 steps, IID's best learning
rate, every eval suite every 250 steps) trained from memory (`data_in_memory=True`: the pool is decoded once,
then each super-batch is an index; docs/benchmarks.md measured 1.5x (IID) to 1.7x (JEST f = 0.8) the streamed
step rate on the 2-core machine). If the metric pre-registration changed the regime (b, steps, resolution),
it would change here, in one place. Every run of `python -m experiments.study2` (and of Study III) is this
recipe plus overrides:

    jestclip train configs/study2.py data=data/bench/pool-swap50 seed=0 run_dir=runs/study2/iid-swap50-s0
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("study.py"), quick=quick)
    return dataclasses.replace(base, run_dir="runs/study2/iid", data_in_memory=True)
