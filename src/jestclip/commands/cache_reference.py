"""``jestclip cache-reference``: embed shards with a frozen reference model, one sidecar per shard."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jestclip.commands.common import device_arg

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cache-reference",
        help="embed shards with a frozen reference model and store the embeddings next to them",
        description="Embed every sample of the shards with a frozen reference model; write sidecars "
        "SHARD.NAME.{json,keys.npy,emb.npy,digest.npy} (a header, sorted keys, float16 embeddings, content "
        "digests) beside each shard or in --cache-dir, that training joins by shard and key. Resumable; "
        "sidecars of changed shards and corrupt or truncated ones are rewritten. Under torchrun every rank "
        "caches its share of the shards (on CUDA: bf16 autocast, decoding workers, pinned memory).",
    )
    parser.add_argument("shards", nargs="+", help="shard paths, brace patterns or directories")
    parser.add_argument("--model", required=True, help="model config name, e.g. jest-tiny or ViT-B-16")
    parser.add_argument("--checkpoint", type=Path, help="weights file of the reference model")
    parser.add_argument(
        "--pretrained",
        help="an open_clip pretrained tag instead (downloads), e.g. webli for ViT-B-16-SigLIP; images and "
        "captions are then preprocessed and tokenised as those weights were trained (with --checkpoint too)",
    )
    parser.add_argument(
        "--loss",
        choices=["sigmoid", "softmax"],
        help="the loss the reference was trained with (default: what --checkpoint holds, else sigmoid)",
    )
    parser.add_argument("--name", default="reference", help="cache name, part of the sidecar file name")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="write the sidecars into this directory (one every rank can read) instead of beside each shard; "
        "needed for shards behind a URL (pipe:, http://); train with reference_cache_dir=DIR",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workers",
        type=int,
        help="processes that read and decode shards while the model embeds (default: 4 on CUDA, 0 on CPU)",
    )
    parser.add_argument(
        "--device", default="auto", type=device_arg, help="cpu, cuda, ... (auto: cuda when available)"
    )


def run(args: argparse.Namespace) -> int:
    from jestclip.commands.common import join_ranks
    from jestclip.train.reference import cache_reference_model

    ranks = join_ranks()  # under torchrun every rank caches its share of the shards
    if args.checkpoint is None and args.pretrained is None:
        raise SystemExit(
            "cache-reference: give the reference model's weights with --checkpoint (or --pretrained)"
        )
    summary = cache_reference_model(
        args.model,
        args.shards,
        name=args.name,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,  # the weights' own preprocessing and tokenizer (checked before download)
        loss=args.loss,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        num_workers=args.workers,
    )
    if ranks.is_main:
        print(json.dumps(summary, indent=1))
    return 0
