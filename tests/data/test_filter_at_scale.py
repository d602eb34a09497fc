"""The static filter at any size: the similarity score streams a shard at a time and splits across ranks, and
writes the keep list the whole-pool computation writes, byte for byte, ties included."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from jestclip.data.keeplist import DIGESTS, HEADER, KEYS, RECORD, _in_memory, filter_shards
from jestclip.data.refcache import CacheMeta, shard_keys, write_sidecar

from .test_loader import make_shards

DIM = 4
FILES = (KEYS, DIGESTS, HEADER, RECORD)


def tied_pool(root: Path) -> list[str]:
    """5 shards of 9 or 4 pairs (so of different sizes) whose cached pairs take four distinct cosines: many
    ties, within and across shards."""
    urls = make_shards(root / "a", 3, 9) + make_shards(root / "b", 2, 4)
    rng = np.random.default_rng(0)
    for url in urls:
        keys = sorted(shard_keys(url))
        image = np.zeros((len(keys), DIM), np.float16)
        text = np.zeros((len(keys), DIM), np.float16)
        image[:, 0] = 1.0
        cos = rng.choice([0.25, 0.5, 0.75, 1.0], size=len(keys))  # four cosines for the whole pool
        text[:, 0], text[:, 1] = cos, np.sqrt(1 - cos**2)
        meta = CacheMeta("fp", "toy", 10.0, -5.0, DIM, os.path.getsize(url))
        write_sidecar(url, "reference", keys, image, text, meta)
    return urls


def files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILES}


def in_memory(urls: list[str], out: Path, keep: float) -> dict[str, bytes]:
    settings = {"shards": urls, "out": str(out), "keep": keep, "score": "similarity", "loss": "sigmoid"}
    settings |= {"batch_size": 1024, "seed": 0, "reference_cache": "reference", "fingerprint": None}
    settings |= {"cache_dir": None}
    kw = {"name": "reference", "fingerprint": None, "cache_dir": None, "progress": False}
    _in_memory(
        urls,
        out,
        keep,
        "similarity",
        settings,
        check_content=True,
        loss="sigmoid",
        batch_size=1024,
        seed=0,
        **kw,
    )
    return files(out)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.77, 1.0])
def test_the_streamed_filter_writes_the_whole_pool_filters_keep_list(tmp_path, keep):
    urls = tied_pool(tmp_path / "pool")
    expected = in_memory(urls, tmp_path / "whole", keep)
    filter_shards(urls, tmp_path / "streamed", keep=keep, progress=False)
    assert files(tmp_path / "streamed") == {**expected, RECORD: files(tmp_path / "streamed")[RECORD]}
    assert not (tmp_path / "streamed" / ".scores").exists()  # the scratch scores are removed


def _filter_worker(rank: int, world: int, store: str, urls: list[str], out: str, score: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        filter_shards(urls, out, keep=0.4, score=score, progress=False)
    except ValueError as exn:
        Path(f"{out}.rank{rank}.err").write_text(str(exn))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 6])  # 6 ranks for 5 shards: one rank has none
def test_ranks_write_the_one_process_keep_list_byte_for_byte(tmp_path, world):
    urls = tied_pool(tmp_path / "pool")
    filter_shards(urls, tmp_path / "one", keep=0.4, progress=False)
    out = tmp_path / "ranks"
    mp.spawn(
        _filter_worker, args=(world, str(tmp_path / "store"), urls, str(out), "similarity"), nprocs=world
    )
    one, ranks = files(tmp_path / "one"), files(out)
    assert {k: v for k, v in ranks.items() if k != RECORD} == {k: v for k, v in one.items() if k != RECORD}


def test_the_loss_score_refuses_ranks_in_one_line(tmp_path):
    urls = tied_pool(tmp_path / "pool")
    out = tmp_path / "ranks"
    mp.spawn(_filter_worker, args=(2, str(tmp_path / "store"), urls, str(out), "loss"), nprocs=2)
    errors = {Path(f"{out}.rank{r}.err").read_text() for r in range(2)}
    assert len(errors) == 1 and errors.pop().startswith("--score loss draws its batches from the whole pool")
