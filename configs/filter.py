"""Static reference-score filter (DataComp's CLIP score): configs/iid.py on the pairs a keep list keeps.

The reference scores every pool pair once, offline; training then draws uniform batches of b from the kept
pairs only (no selection, no reference at train time; per-step FLOPs = IID's). `keep_list` is the directory
`jestclip filter` wrote; a keep list also works with any other method (filter, then JEST).
Run (after `jestclip cache-reference data/bench/pool ...`, see configs/jest.py):
    jestclip filter data/bench/pool --keep 0.5 --out data/bench/keep-similarity-50
    jestclip train configs/filter.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("iid.py"), quick=quick)
    return dataclasses.replace(
        base,
        run_dir="runs/filter",
        keep_list="data/bench/keep-similarity-50",
        method=dataclasses.replace(base.method, method="filter"),
    )
