"""The noise dial: ``jestclip data corrupt`` swaps a seeded share of captions (benchmark/corrupt.py)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import jestclip.benchmark.corrupt as corrupt_module
from jestclip.benchmark.corrupt import corrupt_captions, swap_plan
from jestclip.cli import main
from jestclip.data.quality import quality_entry
from jestclip.data.shards import Pair, png_bytes, shard_name, write_shard

TEXTS = ["edit-cut", "edit-cut", "A frog.", "gramastar", "Une grenouille.", "GRINNING FACE", "mail-sent"]
TEXTS += [f"caption {i}" for i in range(7, 14)]  # 14 pairs
QUALITY = {
    0: quality_entry("edit cut icon", []),
    1: quality_entry("edit cut icon", ["alias_repeat"]),  # image-borne
    2: quality_entry(None, ["near_blank"]),  # image-borne
    3: quality_entry(None, ["boilerplate_title", "generic_keywords"]),  # caption-borne
    4: quality_entry("A frog.", ["non_english"]),  # caption-borne
}


def write_pool(root: Path, shard_size: int = 5) -> Path:
    """A 14-pair pool in 3 shards, keys k00..k13, with a manifest like the builder's."""
    root.mkdir(parents=True)
    pairs = []
    for i, text in enumerate(TEXTS):
        meta = {"source": "icons" if i % 2 else "tuxpaint", "uid": f"u{i}"}
        if i in QUALITY:
            meta["quality"] = QUALITY[i]
        elif i < 10:
            meta["quality"] = quality_entry(f"clean {i}", [])
        pairs.append(Pair(f"k{i:02d}", png_bytes(Image.new("RGB", (4, 4), (i * 10, 0, 0))), text, meta))
    shards = []
    for s in range(0, len(pairs), shard_size):
        shards.append(shard_name(s // shard_size))
        write_shard(root / shards[-1], pairs[s : s + shard_size])
    manifest = {"part": "pool", "count": len(pairs), "shards": shards, "image_size": 4}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def read(root: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of every sample, in shard and member order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


@pytest.fixture
def pool(tmp_path) -> Path:
    return write_pool(tmp_path / "pool")


@pytest.mark.parametrize(
    ("p", "n", "k"), [(0.0, 14, 0), (0.25, 10, 3), (0.35, 10, 4), (0.5, 14, 7), (1.0, 14, 14)]
)
def test_swap_plan_takes_the_stated_share_as_a_derangement(p, n, k):
    texts = TEXTS[:n]
    donor = swap_plan(texts, p, seed=3)
    assert len(donor) == k  # floor(p * n + 0.5): 2.5 -> 3, 3.5 -> 4
    assert sorted(donor.values()) == sorted(donor)  # the receivers give their captions to each other
    assert all(texts[j] != texts[i] for i, j in donor.items())  # none keeps its own caption, nor its text
    assert swap_plan(texts, p, seed=3) == donor and (k < 3 or swap_plan(texts, p, seed=4) != donor)


def test_swap_plan_avoids_equal_texts_whatever_the_seed():
    texts = ["a", "a", "a", "b", "b", "c"]
    for seed in range(50):
        donor = swap_plan(texts, 1.0, seed)
        assert all(texts[j] != texts[i] for i, j in donor.items()), seed


@pytest.mark.parametrize(
    ("texts", "p", "message"),
    [
        (["a", "b"], 1.5, r"swap_captions must be in \[0, 1\], got 1.5"),
        (["a", "b"], -0.1, r"got -0.1"),
        (["a", "b"], float("nan"), r"got nan"),
        (["a", "b", "c"], 0.3, "is 1 pair"),
        (["a", "a", "a", "b"], 1.0, "too few distinct captions"),
    ],
)
def test_swap_plan_refuses_what_it_cannot_do(texts, p, message):
    with pytest.raises(ValueError, match=message):
        swap_plan(texts, p, seed=0)


def test_corrupt_swaps_captions_keeps_keys_images_and_the_rest(pool, tmp_path):
    out = tmp_path / "swap"
    manifest = corrupt_captions(pool, out, swap_captions=0.5, seed=0)
    before, after = read(pool), read(out)
    assert [k for k, _ in after] == [k for k, _ in before] and len({k for k, _ in after}) == 14
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(a["png"] == b["png"] for (_, a), (_, b) in zip(after, before, strict=True))  # images untouched
    donor = swap_plan(TEXTS, 0.5, seed=0)
    index = {key: i for i, (key, _) in enumerate(before)}
    swapped = 0
    for i, ((_, new), (_, old)) in enumerate(zip(after, before, strict=True)):
        meta, own = json.loads(new["json"]), json.loads(old["json"])
        if i not in donor:
            assert new == old  # byte for byte
            continue
        swapped += 1
        j = donor[i]
        assert new["txt"].decode() == TEXTS[j] != TEXTS[i]
        assert meta["caption_of"] == f"k{j:02d}" and index[meta["caption_of"]] == j
        assert {k: v for k, v in meta.items() if k not in ("quality", "caption_of")} == {
            k: v for k, v in own.items() if k != "quality"
        }
        mine, theirs = QUALITY.get(i, own.get("quality")), QUALITY.get(j, {"noise": []})
        image_kinds = [k for k in (mine or {"noise": []})["noise"] if k in ("alias_repeat", "near_blank")]
        caption_kinds = [k for k in theirs["noise"] if k not in ("alias_repeat", "near_blank")]
        expected = quality_entry((mine or {}).get("clean_caption"), ["swapped", *image_kinds, *caption_kinds])
        assert meta["quality"] == expected
        assert meta["quality"]["clean"] is False
    assert swapped == 7
    record = manifest["corrupt"]
    assert record == {
        "format": 1,
        "source": str(pool.resolve()),
        "source_manifest_sha256": hashlib.sha256((pool / "manifest.json").read_bytes()).hexdigest(),
        "swap_captions": 0.5,
        "seed": 0,
        "pairs": 14,
        "swapped": 7,
    }
    assert manifest["complete"] and manifest["count"] == 14 and manifest["image_size"] == 4
    assert manifest["composition"]["all"]["swapped"] == 7
    assert manifest["composition"]["all"]["labelled"] == 10 + sum(
        1 for i in donor if i >= 10
    )  # an unlabelled pair that swaps is labelled "swapped"
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_swapped_pairs_of_an_unlabelled_source(pool, tmp_path):
    donor = swap_plan(TEXTS, 1.0, seed=1)
    corrupt_captions(pool, tmp_path / "swap", swap_captions=1.0, seed=1)
    meta = {key: json.loads(m["json"]) for key, m in read(tmp_path / "swap")}
    for i in range(10, 14):  # no quality entry in the source
        assert i in donor
        theirs = QUALITY.get(donor[i], {"noise": []})["noise"]
        expected = ["swapped", *[k for k in theirs if k not in ("alias_repeat", "near_blank")]]
        assert meta[f"k{i}"]["quality"] == {"clean": False, "clean_caption": None, "noise": expected}


def test_corrupt_is_deterministic_and_resumes_after_a_crash(pool, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    corrupt_captions(pool, whole, swap_captions=0.5, seed=7)
    again = tmp_path / "again"
    corrupt_captions(pool, again, swap_captions=0.5, seed=7)
    assert shard_bytes(again) == shard_bytes(whole)
    other = tmp_path / "other"
    corrupt_captions(pool, other, swap_captions=0.5, seed=8)
    assert shard_bytes(other) != shard_bytes(whole)

    # a crash while writing the second shard: the first is finished, the second left as a .tmp
    real_write, calls = corrupt_module._write, []

    def crash_on_second(path, samples):
        calls.append(path.name)
        if len(calls) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, samples)

    partial = tmp_path / "partial"
    monkeypatch.setattr(corrupt_module, "_write", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        corrupt_captions(pool, partial, swap_captions=0.5, seed=7)
    monkeypatch.setattr(corrupt_module, "_write", real_write)
    assert json.loads((partial / "manifest.json").read_text())["complete"] is False
    first = (partial / "00000.tar").stat().st_mtime_ns
    resumed = corrupt_captions(pool, partial, swap_captions=0.5, seed=7)
    assert (partial / "00000.tar").stat().st_mtime_ns == first  # a finished shard is kept
    assert shard_bytes(partial) == shard_bytes(whole)
    assert resumed == json.loads((whole / "manifest.json").read_text()) | {"complete": True}
    assert not list(partial.glob("*.tmp"))


def test_shards_without_a_manifest_are_corrupted_and_identified_by_their_names_and_sizes(tmp_path):
    """A user's own shards (no manifest.json): the same swaps as with one; a changed shard is refused."""
    with_manifest = corrupt_captions(write_pool(tmp_path / "a"), tmp_path / "a-out", swap_captions=0.5)
    bare = write_pool(tmp_path / "b")
    (bare / "manifest.json").unlink()
    manifest = corrupt_captions(bare, tmp_path / "b-out", swap_captions=0.5)
    assert (
        manifest["count"] == 14 and manifest["corrupt"]["swapped"] == with_manifest["corrupt"]["swapped"] == 7
    )
    assert shard_bytes(tmp_path / "b-out") == shard_bytes(tmp_path / "a-out")
    listing = "".join(f"{s.name}\t{s.stat().st_size}\n" for s in sorted(bare.glob("*.tar")))
    assert manifest["corrupt"]["source_manifest_sha256"] is None
    assert manifest["corrupt"]["source_shards_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert corrupt_captions(bare, tmp_path / "b-out", swap_captions=0.5) == manifest  # a rerun: done
    write_shard(bare / shard_name(0), [])  # the source changed
    with pytest.raises(ValueError, match=r"another config \(source_shards_sha256\)"):
        corrupt_captions(bare, tmp_path / "b-out", swap_captions=0.5)


def test_corrupt_refuses_bad_input(pool, tmp_path):
    with pytest.raises(ValueError, match="not a shard directory"):
        corrupt_captions(tmp_path / "missing", tmp_path / "o1", swap_captions=0.5)
    with pytest.raises(ValueError, match="is the source directory"):
        corrupt_captions(pool, pool, swap_captions=0.5)
    corrupt_captions(pool, tmp_path / "o3", swap_captions=0.5)
    with pytest.raises(ValueError, match=r"another config \(seed, swap_captions\)"):
        corrupt_captions(pool, tmp_path / "o3", swap_captions=0.25, seed=1)
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not the output of jestclip data corrupt"):
        corrupt_captions(pool, tmp_path / "o4", swap_captions=0.5)
    assert (tmp_path / "o4" / "notes.txt").read_text() == "mine"  # nothing lost
    with pytest.raises(ValueError, match="not written by jestclip data corrupt"):
        corrupt_captions(pool, write_pool(tmp_path / "o5"), swap_captions=0.5)


def test_corrupt_refuses_compressed_shards_it_would_leave_out(pool, tmp_path):
    from .test_loader import gzipped

    gzipped(str(pool / shard_name(1)))
    with pytest.raises(
        ValueError, match=r"holds 1 compressed shard\(s\) \(00001.tar.gz\) that jestclip data"
    ):
        corrupt_captions(pool, tmp_path / "out", swap_captions=0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--swap-captions", "2"], "swap_captions must be in [0, 1], got 2.0"),
        (["--swap-captions", "0.5", "--seed", "1"], "written with another config (seed)"),
    ],
)
def test_corrupt_command_errors_are_one_line(pool, tmp_path, capsys, args, message):
    out = tmp_path / "swap"
    assert main(["data", "corrupt", str(pool), str(out), "--swap-captions", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 7 of 14 pairs swapped" in printed
    assert any(line.split()[:2] == ["swapped", "7"] for line in printed.splitlines())  # the composition
    assert main(["data", "corrupt", str(pool), str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("jestclip data")
