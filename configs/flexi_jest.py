"""Flexi-JEST: configs/jest.py scoring with FlexiViT patch x2 and learning half the selection
at each resolution.

Run: jestclip train configs/flexi_jest.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("jest.py"), quick=quick)
    return dataclasses.replace(
        base,
        run_dir="runs/flexi-jest",
        method=dataclasses.replace(base.method, method="flexi-jest", approx="flexi", approx_fraction=0.5),
    )
