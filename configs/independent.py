"""Independent prioritisation baseline: configs/jest.py with per-example learnability.

Run: jestclip train configs/independent.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("jest.py"), quick=quick)
    return dataclasses.replace(
        base, run_dir="runs/independent", method=dataclasses.replace(base.method, method="independent")
    )
