"""JEST at f = 0.5 (B = 2b): configs/jest.py with a smaller super-batch.

Run: jestclip train configs/jest_f05.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("jest.py"), quick=quick)
    return dataclasses.replace(base, run_dir="runs/jest-f05", filter_ratio=0.5)
