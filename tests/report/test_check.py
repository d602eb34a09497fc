"""``jestclip check-reference`` (report.check): the swap test equals the real pipeline it replaces (corrupt a
copy, cache it, filter it, count), the memorisation figure, and the verdicts."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from jestclip.benchmark.corrupt import corrupt_captions
from jestclip.cli import main
from jestclip.data.keeplist import KeepList, filter_shards
from jestclip.models import create_model
from jestclip.report.check import ReferenceCheck, check_reference, pool_recall, swapped_share_kept
from jestclip.selection import Embeddings
from jestclip.train.reference import cache_model_embeddings

from ..data.test_loader import make_shards


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Generated shards (keys in tar order) with a micro reference's embeddings cached as ``ref``."""
    root = tmp_path_factory.mktemp("pool") / "pool"
    root.mkdir()
    urls = make_shards(root, 3, 10)
    torch.manual_seed(1)
    cache_model_embeddings(create_model("jest-micro"), "jest-micro", urls, name="ref")
    return root


def swapped_among_kept(pool: Path, keep: KeepList) -> float:
    swapped = kept = 0
    for shard in sorted(pool.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    key = member.name.removesuffix(".json")
                    if keep(str(shard), key):
                        kept += 1
                        swapped += "caption_of" in json.loads(tar.extractfile(member).read())
    return swapped / kept


@pytest.mark.parametrize("score", ["similarity", "loss"])
def test_the_swap_test_equals_corrupting_a_copy_caching_and_filtering_it(pool, tmp_path, score):
    copy = tmp_path / "swapped"
    corrupt_captions(pool, copy, 0.5, seed=0)
    torch.manual_seed(1)  # the same reference weights
    cache_model_embeddings(
        create_model("jest-micro"), "jest-micro", sorted(map(str, copy.glob("*.tar"))), name="ref"
    )
    out = tmp_path / "keep"
    filter_shards(str(copy), out, keep=0.5, score=score, name="ref", progress=False)
    real = swapped_among_kept(copy, KeepList(out))
    check = check_reference(str(pool), name="ref", swap=0.5, keep=0.5, score=score, seed=0)
    assert check.pairs == 30 and check.shards == 3
    assert check.swapped_kept == pytest.approx(real)  # the same plan, the same scores, the same cut


def test_a_reference_that_tells_captions_apart_keeps_few_swapped_pairs():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(200, 16), dim=-1)
    exact = Embeddings(image, image.clone(), 10.0, -10.0)  # every caption embeds as its own image does
    assert swapped_share_kept(exact, swap=0.5, keep=0.5, seed=0) == 0.0
    blind = Embeddings(image, torch.nn.functional.normalize(torch.randn(200, 16), dim=-1), 10.0, -10.0)
    assert 0.35 < swapped_share_kept(blind, swap=0.5, keep=0.5, seed=0) < 0.65  # chance: 50%


def test_pool_recall_is_gallery_r5_within_shards():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(300, 32), dim=-1)
    assert pool_recall([Embeddings(image, image, 1.0, 0.0)]) == 100.0
    noise = torch.nn.functional.normalize(torch.randn(300, 32), dim=-1)
    assert pool_recall([Embeddings(image, noise, 1.0, 0.0)]) < 15.0  # chance R@5 in galleries of 100: 5%
    with pytest.raises(ValueError, match="no cached pairs"):
        pool_recall([])


def verdicts(swapped_kept: float, pool_r5: float, held_out_r5: float | None) -> dict[str, str]:
    check = ReferenceCheck(
        "ref", "m", 1, 100, 0.5, 0.5, "similarity", swapped_kept, pool_r5, held_out_r5, "x"
    )
    return check.verdicts()


def test_the_verdicts_rest_on_study_ii_s_references():
    strong = verdicts(0.126, 68.7, 17.45)  # Study II's strong reference on the natural pool
    assert strong["jest"].startswith("use it: it keeps 12.6% swapped pairs")
    assert strong["filter"].startswith("use it")
    assert strong["drrho"].startswith("do not steer with it: R@5 68.7% on the pool's own pairs against 17.4%")
    weak = verdicts(0.422, 16.07, 21.04)  # the weak one (trained on curated only)
    assert weak["jest"].startswith("little to gain from it") and weak["filter"].startswith("little to gain")
    assert weak["drrho"].startswith("can steer") and "(0.76x)" in weak["drrho"]
    assert verdicts(0.3, 20.0, None)["jest"].startswith("some gain expected")
    assert verdicts(0.3, 20.0, None)["drrho"].startswith("not judged")


def test_the_command_prints_one_verdict_per_method_and_writes_nothing(pool, capsys):
    before = sorted(p.name for p in pool.iterdir())
    assert main(["check-reference", str(pool), "--reference-cache", "ref", "--held-out", str(pool)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "reference 'ref' (jest-micro) on 30 pairs of 3 shards"
    assert [line.split()[0] for line in out[3:]] == ["jest", "filter", "drrho"]
    assert "can steer" in out[5]  # held out = the pool itself: ratio 1
    assert sorted(p.name for p in pool.iterdir()) == before
    assert main(["check-reference", str(pool), "--reference-cache", "ref", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["pairs"] == 30
        and data["memorisation"] is None
        and set(data["verdicts"]) == {"jest", "filter", "drrho"}
    )


def test_a_missing_cache_is_one_line(pool, capsys):
    assert main(["check-reference", str(pool), "--reference-cache", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jestclip check-reference: ") and len(err.strip().splitlines()) == 1
