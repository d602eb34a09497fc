"""JEST: joint learnability selection of b from B = b / (1 - f), f = 0.8
(jest_f05.py, jest_f09.py, independent.py and flexi_jest.py derive from it).

The benchmark recipe with the tiny model (`jest-tiny`, 64 px); quick=True is a 20-step check of a setup.
Run: jestclip train configs/jest.py [--quick] [key=value ...]
"""

from __future__ import annotations

from jestclip.train.config import MethodConfig, TrainConfig
from jestclip.train.optim import OptimConfig


def get_config(quick: bool = False) -> TrainConfig:
    batch = 64 if quick else 256
    return TrainConfig(
        run_dir="runs/jest",
        data="data/bench/pool",
        filter_ratio=0.8,
        method=MethodConfig("jest", batch_size=batch, n_chunks=16),
        model="jest-tiny",
        optim=OptimConfig(lr=1e-3, warmup_fraction=0.01),
        steps=20 if quick else 2000,
        log_every=5 if quick else 20,
        checkpoint_every=10 if quick else 200,
        eval_data="data/bench",
        eval_every=10 if quick else 200,
        eval_limit=200 if quick else None,
    )
