"""Reference model: configs/iid.py trained on the curated set (the paper's WebLI-curated analogue).

Run: jestclip train configs/reference.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("iid.py"), quick=quick)
    return dataclasses.replace(base, run_dir="runs/reference", data="data/bench/curated")
