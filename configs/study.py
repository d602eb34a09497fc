"""Study I, the evidence study (docs/studies/study1.md): `jest-micro` at 32 px, b = 64, 3,000 steps on
data/bench/pool, evaluated on every eval suite every 250 steps (13 points per curve). Every run of the study
is this recipe plus overrides, e.g.

    jestclip train configs/study.py run_dir=runs/study/iid-s0
    jestclip train configs/study.py method.method=jest filter_ratio=0.8 reference_cache=study-reference \
        run_dir=runs/study/jest-f08-s0

The learning rate is IID's best of a sweep (docs/studies/study1.md, "Learning rate"); quick=True is a 20-step
check.
"""

from __future__ import annotations

from jestclip.train.config import MethodConfig, TrainConfig
from jestclip.train.optim import OptimConfig


def get_config(quick: bool = False) -> TrainConfig:
    steps = 20 if quick else 3000
    return TrainConfig(
        run_dir="runs/study/iid",
        model="jest-micro",
        data="data/bench/pool",
        reference_cache=None,
        filter_ratio=0.8,
        method=MethodConfig("iid", batch_size=64, n_chunks=16),
        optim=OptimConfig(lr=5e-4, warmup_fraction=0.05),
        steps=steps,
        log_every=5 if quick else 20,
        checkpoint_every=10 if quick else 250,
        eval_data="data/bench",
        eval_every=10 if quick else 250,
        eval_limit=200 if quick else None,
        num_workers=1,  # one loader process; with OMP_NUM_THREADS=1 the step has the other core (2-core CPU)
    )
