"""Integration: build a small capped benchmark from the real Debian/npm packages.

Needs `jestclip data sources --install` (the README's test command runs it). Skipped where the sources are
missing, except under CI, where a missing source is a failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter

import pytest

from jestclip.benchmark import SOURCES, BuildConfig, SourcePaths, build, missing_sources
from jestclip.cli import main
from jestclip.data import SuperBatchStream
from jestclip.data.quality import quality_labels, tally

MISSING = missing_sources(SourcePaths(), list(SOURCES))
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"benchmark sources not installed: {sorted(MISSING)}", allow_module_level=True)

PARTS = ["pool", "curated", "eval/emoji", "eval/icons", "eval/openclipart", "eval/tuxpaint"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BuildConfig(limit=60, workers=2, shard_size=40)
    return out, cfg, build(out, cfg, SourcePaths())


def read_part(root):
    samples, skipped = [], Counter()
    for batch in SuperBatchStream(root, batch_size=64, shuffle_shards=False):
        samples += list(zip(batch.keys, batch.texts, batch.meta, strict=True))
        skipped.update(batch.skipped)
    return samples, skipped


def test_every_part_is_written_and_matches_its_manifest(built):
    out, _, summary = built
    assert summary["complete"] and set(summary["parts"]) == set(PARTS)
    for part in PARTS:
        manifest = json.loads((out / part / "manifest.json").read_text())
        samples, skipped = read_part(out / part)
        assert manifest["count"] == len(samples) > 0, part
        assert not skipped, part
        assert len({k for k, _, _ in samples}) == len(samples), f"duplicate keys in {part}"
        assert all(text.strip() for _, text, _ in samples)
    pool_sources = summary["parts"]["pool"]["by_source"]
    assert set(pool_sources) == set(SOURCES)


def test_no_eval_image_is_in_training_parts(built):
    out, _, _ = built
    hashes = {part: {m["image_sha1"] for _, _, m in read_part(out / part)[0]} for part in PARTS}
    evaluated = set().union(*(hashes[p] for p in PARTS if p.startswith("eval/")))
    assert evaluated
    assert not evaluated & (hashes["pool"] | hashes["curated"])


def test_eval_labels_index_the_suite_classes(built):
    out, _, _ = built
    for suite in ("emoji", "icons", "openclipart"):
        manifest = json.loads((out / "eval" / suite / "manifest.json").read_text())
        for _, _, meta in read_part(out / "eval" / suite)[0]:
            for task, label in meta["labels"].items():
                assert 0 <= label < len(manifest["classes"][task])


def test_pool_samples_carry_ground_truth_consistent_with_curated(built):
    out, _, summary = built
    pool, _ = read_part(out / "pool")
    metas = [meta for _, _, meta in pool]
    _, known = quality_labels(metas)
    assert known.all()  # every pool sample is labelled, with known kinds
    assert summary["parts"]["pool"]["composition"] == tally(metas)
    assert 0 < summary["parts"]["pool"]["composition"]["all"]["clean"] < len(pool)
    for source in SOURCES:
        assert summary["parts"]["pool"]["composition"][source]["labelled"] > 0
    # the clean caption of a pool pair is the caption `curated` gives its drawing
    curated = {meta["uid"]: text for _, text, meta in read_part(out / "curated")[0]}
    assert curated
    for _, _, meta in pool:
        if meta["uid"] in curated:
            assert meta["quality"]["clean_caption"] == curated[meta["uid"]], meta["uid"]
    for _, _, meta in pool:  # a clean TuxPaint pool caption is in an English locale (en_GB: "coloured")
        if meta["source"] == "tuxpaint":
            english = meta["language"] == "en" or meta["language"].startswith("en_")
            assert meta["quality"]["clean"] == english, meta["uid"]


def test_rebuild_resumes_without_rewriting(built):
    out, cfg, summary = built
    shard = next((out / "pool").glob("*.tar"))
    before = shard.stat().st_mtime_ns
    again = build(out, cfg, SourcePaths())
    assert shard.stat().st_mtime_ns == before
    assert {p: m["count"] for p, m in again["parts"].items()} == {
        p: m["count"] for p, m in summary["parts"].items()
    }
    with pytest.raises(ValueError, match="different config"):
        build(out, BuildConfig(limit=61, workers=2, shard_size=40), SourcePaths())


def test_corrupt_members_in_a_real_shard_are_skipped_and_counted(built, tmp_path):
    out, _, _ = built
    shard = tmp_path / "00000.tar"
    shutil.copy(next((out / "curated").glob("*.tar")), shard)
    with tarfile.open(shard, "a") as tar:
        for name, data in {"zz.png": b"\x89PNG broken", "zz.txt": b"caption", "yy.txt": b"no image"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, skipped = read_part(shard)
    assert len(samples) > 0 and skipped == {"bad_image": 1, "missing_image": 1}


def test_inspect_command(built, capsys):
    out, _, _ = built
    assert main(["data", "inspect", str(out / "curated"), "--examples", "3"]) == 0
    printed = capsys.readouterr().out
    assert "pairs" in printed and len(printed.strip().splitlines()) == 4  # curated samples are unlabelled
    assert main(["data", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "composition of pool" in printed and "\nclean " in printed
