"""Caching a reference at scale: shards split across ranks and decoded in loader workers write the sidecars
one process writes, byte for byte; a shard behind a URL is fetched once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jestclip.data.caching import cache_reference
from jestclip.models import image_transform

from .test_loader import make_shards

TRANSFORM = image_transform("jest-micro")


def embed(images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in for a model: image rows from pixel statistics, text rows from the bytes."""
    image = torch.stack([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=2).flatten(1)
    text = torch.tensor([[float(sum(t.encode()) % 97), float(len(t)), 1.0, 2.0, 3.0, 4.0] for t in texts])
    return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)


def cache(shards, **kw) -> dict:
    return cache_reference(
        embed,
        shards,
        model_name="toy",
        fingerprint="fp",
        scale=10.0,
        bias=-5.0,
        transform=TRANSFORM,
        batch_size=4,
        progress=False,
        **kw,
    )


def sidecars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.rglob("*.reference.*"))}


@pytest.fixture
def shards(tmp_path) -> list[str]:
    return make_shards(tmp_path / "pool", 5, 7)  # 7 samples a shard: batches of 4 end mid-shard


def test_loader_workers_write_the_one_process_sidecars(tmp_path, shards):
    one = cache(shards, cache_dir=tmp_path / "one")
    two = cache(shards, cache_dir=tmp_path / "two", num_workers=2)
    counts = {"written": 5, "changed": 0, "repaired": 0, "kept": 0, "samples": 35, "skipped": {}}
    assert one.pop("seconds") > 0 and two.pop("seconds") > 0 and one == two == counts
    first, second = sidecars(tmp_path / "one"), sidecars(tmp_path / "two")
    assert len(first) == 20 and list(first.values()) == list(second.values())  # names hold the cache dir
    assert cache(shards, cache_dir=tmp_path / "two", num_workers=2)["kept"] == 5  # resumed: all kept


def _cache_worker(rank: int, world: int, store: str, shards: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        summary = cache(shards, cache_dir=out)
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_shards_and_write_the_one_process_sidecars(tmp_path, shards, world):
    cache(shards, cache_dir=tmp_path / "one")
    out = tmp_path / "ranks"
    mp.spawn(_cache_worker, args=(world, str(tmp_path / "store"), shards, str(out)), nprocs=world)
    assert list(sidecars(out).values()) == list(sidecars(tmp_path / "one").values())
    summaries = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    assert all(s == summaries[0] for s in summaries) and summaries[0]["written"] == 5  # summed over ranks
    assert summaries[0]["seconds"] > 0  # the slowest rank's


def test_a_shard_behind_a_url_is_fetched_once(tmp_path, shards):
    count = tmp_path / "fetches"
    urls = [f"pipe:sh -c 'echo x >> {count}; cat {shard}'" for shard in shards[:2]]
    assert cache(urls, cache_dir=tmp_path / "cache")["written"] == 2
    assert count.read_text().count("x") == 2  # embedded and its skipped samples' digests: one download each
    assert cache(urls, cache_dir=tmp_path / "cache")["kept"] == 2
    assert count.read_text().count("x") == 4  # a cache hit: one more each, to compare the content
