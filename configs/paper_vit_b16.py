"""The paper's setting (appendix A.1) for GPU users: ViT-B/16 SigLIP, b = 32,768, f = 0.8, 16 chunks.

The paper trains 3B examples (~91k steps at b = 32k) with lr 1e-3, 1% warm-up then cosine, weight decay 1e-4,
Adam beta2 = 0.95, clipping at 1.0. Point `data` at your shards and cache the reference embeddings first.
"""

from __future__ import annotations

from jestclip.train.config import MethodConfig, TrainConfig
from jestclip.train.optim import OptimConfig


def get_config(quick: bool = False) -> TrainConfig:
    batch = 256 if quick else 32_768
    return TrainConfig(
        run_dir="runs/paper-vit-b16-jest",
        model="ViT-B-16",
        data="/path/to/shards/{00000..09999}.tar",
        method=MethodConfig("jest", batch_size=batch, n_chunks=16, gain=100.0),
        filter_ratio=0.8,
        optim=OptimConfig(lr=1e-3, weight_decay=1e-4, beta2=0.95, warmup_fraction=0.01, grad_clip=1.0),
        steps=20 if quick else 91_553,
        log_every=10 if quick else 100,
        checkpoint_every=10 if quick else 1000,
        num_workers=8,
        draft_decode=True,  # web JPEGs are mostly larger than 2 x 224 px: decode them at 1/2-1/8 scale
    )
