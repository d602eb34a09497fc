"""JEST at f = 0.9 (B = 10b): configs/jest.py with a larger super-batch.

Run: jestclip train configs/jest_f09.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("jest.py"), quick=quick)
    return dataclasses.replace(base, run_dir="runs/jest-f09", filter_ratio=0.9)
