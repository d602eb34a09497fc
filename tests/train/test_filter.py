"""The filter method end to end: `jestclip filter` writes a keep list, `jestclip train` reads its pairs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from jestclip.cli import main
from jestclip.commands.filter import SCORES
from jestclip.data import loader
from jestclip.data.keeplist import KeepList
from jestclip.models import create_model, forward_flops
from jestclip.selection import FILTER_SCORES
from jestclip.train.config import ConfigError, MethodConfig, TrainConfig
from jestclip.train.loop import train
from jestclip.train.reference import cache_model_embeddings

from ..data.test_loader import make_shards
from .test_loop import cached_shards, config, same_run


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[list[str], Path]:
    """Two shards of 12 with a micro reference cached, and the keep list of half of them by CLIP score."""
    root = tmp_path_factory.mktemp("filter")
    urls = cached_shards(root / "shards", 2, 12)
    assert main(["filter", *urls, "--keep", "0.5", "--out", str(root / "keep")]) == 0
    return urls, root / "keep"


def kept_keys(keep: Path, urls: list[str]) -> set[str]:
    return set().union(*(KeepList(keep).keys(url) for url in urls))


def test_the_command_writes_the_keep_list_and_its_record(pool, capsys):
    urls, keep = pool
    header = json.loads((keep / "keep.json").read_text())
    assert (header["kept"], header["total"], header["keep"], header["score"]) == (12, 24, 0.5, "similarity")
    assert header["reference"]["model"] == "jest-micro" and len(header["reference"]["fingerprint"]) > 12
    assert [s["url"] for s in header["shards"]] == [str(Path(u).resolve()) for u in urls]
    assert json.loads((keep / "filter.json").read_text())["settings"]["reference_cache"] == "reference"
    assert len(kept_keys(keep, urls)) == 12
    assert SCORES == FILTER_SCORES  # the command's choices, written out to keep --help free of torch


def record_decoded(monkeypatch) -> list[str]:
    """The keys of the samples the loader decodes from now on."""
    decoded: list[str] = []
    real = loader.decode_sample
    monkeypatch.setattr(
        "jestclip.data.stream.decode_sample",
        lambda raw, **kw: decoded.append(raw["__key__"]) or real(raw, **kw),
    )
    return decoded


def test_a_filter_run_learns_only_kept_pairs_at_iid_cost(tmp_path, pool, monkeypatch):
    urls, keep = pool
    decoded = record_decoded(monkeypatch)
    cfg = config(tmp_path / "run", urls, "filter", keep_list=str(keep))
    last = train(cfg, progress=False)
    assert decoded and set(decoded) <= kept_keys(keep, urls)
    assert last["skipped/not_kept"] > 0 and last["samples_skipped"] == last["skipped/not_kept"]
    assert last["examples_learned"] == 12 and last["examples_scored"] == 0 and last["flops_reference"] == 0.0
    f = forward_flops(create_model("jest-micro"), image_size=32, context_length=16)
    assert last["flops_total"] == pytest.approx(3 * 3 * f.total * 4)  # 3 steps of IID's 3F·b, b = 4
    assert json.loads((Path(cfg.run_dir) / "config.json").read_text())["keep_list"] == str(keep)


def test_a_resumed_filter_run_is_bitwise_the_uninterrupted_one(tmp_path, pool):
    urls, keep = pool
    whole = config(tmp_path / "whole", urls, "filter", steps=5, keep_list=str(keep))
    train(whole, progress=False)
    parts = config(tmp_path / "parts", urls, "filter", steps=5, stop_after=2, keep_list=str(keep))
    train(parts, progress=False)
    train(dataclasses.replace(parts, stop_after=None), progress=False)
    assert same_run(whole.run_dir, parts.run_dir)


def test_any_method_can_train_on_a_keep_list(tmp_path, pool, monkeypatch):
    urls, keep = pool
    decoded = record_decoded(monkeypatch)
    last = train(config(tmp_path / "jest", urls, "jest", steps=2, keep_list=str(keep)), progress=False)
    assert last["examples_scored"] == 16 and set(decoded) <= kept_keys(keep, urls)  # filter, then JEST


def test_a_keep_list_of_other_shards_fails_before_training(tmp_path, pool):
    urls, keep = pool
    cfg = config(tmp_path / "run", urls[:1], "filter", keep_list=str(keep))
    cfg = dataclasses.replace(cfg, data=urls[0])
    with pytest.raises(
        ValueError, match=rf"keep list {keep} was written for other shards: its shard .*00001"
    ):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_filter_method_needs_a_keep_list():
    with pytest.raises(ConfigError, match=r"^config: keep_list = None must be set for method 'filter'"):
        TrainConfig(method=MethodConfig("filter"))
    assert TrainConfig(method=MethodConfig("filter"), keep_list="k").super_batch == 256  # no selection: B = b


def test_a_resume_refuses_a_keep_list_written_again_at_the_same_path(tmp_path, pool):
    urls, first = pool
    keep = tmp_path / "keep"
    shutil.copytree(first, keep)
    cfg = config(tmp_path / "run", urls, "filter", steps=5, stop_after=2, keep_list=str(keep))
    train(cfg, progress=False)
    record = json.loads((tmp_path / "run" / "keep_list.json").read_text())
    assert record == {"path": str(keep), "sha256": KeepList(keep).sha256, "kept": 12, "keep": 0.5}
    shutil.rmtree(keep)  # the filter run again, into the same directory, keeping another fraction
    assert main(["filter", *urls, "--keep", "0.25", "--out", str(keep)]) == 0
    resume = dataclasses.replace(cfg, stop_after=None)
    with pytest.raises(ValueError) as info:
        train(resume, progress=False)
    assert str(info.value) == (
        f"keep list {keep} was written again since this run started (keep.json sha256 "
        f"{record['sha256'][:12]} then, {KeepList(keep).sha256[:12]} now; 12 pairs kept then, 6 now); resume "
        "with the keep list it started with or start a new run_dir"
    )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # nothing trained on the new list
    shutil.rmtree(keep)
    shutil.copytree(first, keep)  # the keep list it started with, written again byte for byte: resumes
    assert train(resume, progress=False)["step"] == 5


def test_filter_and_train_on_shards_behind_a_url(tmp_path):
    """`jestclip filter --cache-dir` on ``pipe:`` shards, then a filter run reading them by the same URLs."""
    local = make_shards(tmp_path / "pool", 2, 12)
    pattern = f"pipe:cat {tmp_path}/pool/{{00000..00001}}.tar"
    torch.manual_seed(1)
    cache_model_embeddings(create_model("jest-micro"), "jest-micro", pattern, cache_dir=tmp_path / "c")
    out = str(tmp_path / "keep")
    assert main(["filter", pattern, "--keep", "0.5", "--out", out, "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "keep" / "filter.json").read_text())["settings"]["cache_dir"] == str(
        tmp_path / "c"
    )
    cfg = config(tmp_path / "run", local, "filter", keep_list=out)
    last = train(dataclasses.replace(cfg, data=pattern), progress=False)
    assert last["step"] == 3 and last["skipped/not_kept"] > 0 and last["examples_learned"] == 12
