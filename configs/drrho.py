"""DRRho-style reference steering: configs/iid.py learning with the learner's logits minus the reference's
(Wei et al. 2025, arXiv 2505.06699; docs/selection.md).

What differs from iid.py: the method (`drrho`: every batch as drawn, no selection, the steered loss) and the
reference cache it reads (`reference`, the embeddings `jestclip cache-reference` writes beside the pool's
shards, as for jest.py). A step costs what an IID step costs (reference embeddings cached).
Run: jestclip train configs/drrho.py [--quick] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jestclip.train.config import TrainConfig, load_recipe


def get_config(quick: bool = False) -> TrainConfig:
    base = load_recipe(Path(__file__).with_name("iid.py"), quick=quick)
    return dataclasses.replace(
        base,
        run_dir="runs/drrho",
        reference_cache="reference",
        method=dataclasses.replace(base.method, method="drrho"),
    )
