"""IID baseline: uniform batches of b from the pool (reference.py derives from it).

The benchmark recipe with the tiny model (`jest-tiny`, 64 px); quick=True is a 20-step check of a setup.
Run: jestclip train configs/iid.py [--quick] [key=value ...]
"""

from __future__ import annotations

from jestclip.train.config import MethodConfig, TrainConfig
from jestclip.train.optim import OptimConfig


def get_config(quick: bool = False) -> TrainConfig:
    batch = 64 if quick else 256
    return TrainConfig(
        run_dir="runs/iid",
        data="data/bench/pool",
        reference_cache=None,
        method=MethodConfig("iid", batch_size=batch),
        model="jest-tiny",
        optim=OptimConfig(lr=1e-3, warmup_fraction=0.01),
        steps=20 if quick else 2000,
        log_every=5 if quick else 20,
        checkpoint_every=10 if quick else 200,
        eval_data="data/bench",
        eval_every=10 if quick else 200,
        eval_limit=200 if quick else None,
    )
