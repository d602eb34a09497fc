"""Benchmark planning rules and the shard writer, on synthetic drawings."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from jestclip.benchmark.builder import (
    BuildConfig,
    EnglishWords,
    Entry,
    Plan,
    _plan_icons,
    _plan_openclipart,
    _plan_tuxpaint,
    write_plan,
)
from jestclip.benchmark.catalog import Drawing
from jestclip.benchmark.render import render_svg
from jestclip.data import SuperBatchStream

WORDS = "red apple fruit food a drawing of the blue bird animal cut edit icon sun moon water ski"


@pytest.fixture
def english(tmp_path) -> EnglishWords:
    path = tmp_path / "words"
    path.write_text("\n".join(WORDS.split()))
    return EnglishWords(path)


def clipart(uid: str, title: str, keywords: list[str], folder: str = "food/fruit", description: str = ""):
    fields = {"title": title, "description": description, "keywords": keywords, "folder": folder}
    return Drawing("openclipart", f"openclipart/{uid}", ("svg", "x.svg"), "openclipart", folder, "pd", fields)


def new_plan() -> Plan:
    return Plan(parts=defaultdict(list), suites={})


def test_openclipart_curated_filter(english):
    drawings = [
        clipart(
            "a", "Red apple", ["fruit", "unsorted", "red apple"]
        ),  # English title + good keyword: curated
        clipart("b", "Mela rossa", ["fruit"]),  # Italian title: not curated
        clipart("c", "Tigre01", ["animal"]),  # file-name-like title: not curated
        clipart("d", "Red apple", []),  # no non-generic keyword
        clipart("e", "gramastar", ["fruit"], description="a blue bird"),  # description rescues it
    ] + [clipart(f"g{i}", "gramastar", ["food"]) for i in range(10)]  # boilerplate title x11
    out = new_plan()
    cfg = BuildConfig(heldout_fraction=0.0, generic_keyword=0.5)
    _plan_openclipart(drawings, drawings, cfg, english, out)
    curated = {e.drawing.uid.split("/")[1]: e.text for e in out.parts["curated"]}
    assert curated == {"a": "Red apple, fruit", "e": "a blue bird, fruit"}
    pool = {e.drawing.uid.split("/")[1]: e.text for e in out.parts["pool"]}
    assert pool["b"] == "Mela rossa fruit" and pool["a"] == "Red apple fruit unsorted red apple"  # raw
    stats = out.stats["openclipart"]
    assert stats["curated_filter_pass"]["curated"] == 2
    assert stats["generic_keywords"] == {"food": 10, "unsorted": 1}  # food is on > 50% of drawings


def test_openclipart_heldout_folders_are_eval_only(english):
    drawings = [clipart(f"x{i}", "Red apple", ["fruit"], folder="food/fruit") for i in range(40)]
    drawings += [clipart(f"y{i}", "Blue bird", ["animal"], folder="animals/birds") for i in range(5)]
    out = new_plan()
    _plan_openclipart(
        drawings, drawings, BuildConfig(heldout_fraction=0.5, populated_folder=20), english, out
    )
    held = {e.drawing.uid for e in out.parts["eval/openclipart"]}
    train = {e.drawing.uid for p in ("pool", "curated") for e in out.parts[p]}
    assert held and not held & train
    assert out.suites["openclipart"]["classes"] == {"folder": ["fruit"]}  # birds has < 20 drawings
    assert all(e.meta["labels"] == {"folder": 0} for e in out.parts["eval/openclipart"])


def icon(theme: str, name: str, aliases=(), heldout=False):
    fields = {"name": name, "aliases": list(aliases), "context": "actions", "heldout": heldout}
    return Drawing("icons", f"icons/{theme}/{name}", ("svg", "x.svg"), theme, name, "GPL", fields)


def test_icons_semantic_names_and_parts(english):
    themes = ["Papirus", "Numix", "Moka", "Faba", "Paper"]
    drawings = [icon(t, "edit-cut", aliases=["gtk-cut"]) for t in themes]
    drawings += [icon(t, "gtk-cut") for t in ("Obsidian",)]
    drawings += [icon("Papirus", "nm-vpn-connecting06"), icon("Tango", "edit-cut", heldout=True)]
    drawings += [icon("Tango", "application-x-foo", heldout=True)]
    out = new_plan()
    drawings += [icon(t, "amarok-clock") for t in themes]  # semantic, but not English words
    _plan_icons(
        drawings, drawings, BuildConfig(semantic_themes=5, curated_icon_themes=("Papirus",)), english, out
    )
    assert out.suites["icons"]["classes"] == {"name": ["edit cut"]}
    assert out.stats["icons"]["curated_filter_pass"] == {"seen": 3, "semantic_name": 2, "curated": 1}
    assert [(e.text, e.meta["labels"]) for e in out.parts["eval/icons"]] == [("edit cut icon", {"name": 0})]
    assert [e.text for e in out.parts["curated"]] == ["edit cut icon"]
    pool = sorted(e.text for e in out.parts["pool"])
    assert pool.count("gtk-cut") == 6 and "nm-vpn-connecting06" in pool  # raw names and aliases kept
    assert len({e.key for e in out.parts["pool"]}) == len(out.parts["pool"])


def test_tuxpaint_pool_languages_and_heldout():
    drawings = [
        Drawing(
            "tuxpaint",
            f"tuxpaint/s{i}",
            ("bitmap", "x.png"),
            "tuxpaint",
            f"s{i}",
            "GPL-2",
            {
                "captions": {"en": f"A thing {i}.", "fr": f"Une chose {i}.", "de": f"Ein Ding {i}."},
                "category": "c",
            },
        )
        for i in range(60)
    ]
    out = new_plan()
    _plan_tuxpaint(drawings, drawings, BuildConfig(heldout_fraction=0.25), out)
    assert 5 < len(out.parts["eval/tuxpaint"]) < 30
    assert all(e.text.startswith("A thing") for e in out.parts["eval/tuxpaint"] + out.parts["curated"])
    languages = {e.meta["language"] for e in out.parts["pool"]}
    assert languages == {"en", "fr", "de"}


def png_drawing(tmp_path: Path, name: str, color: tuple[int, int, int]) -> Drawing:
    path = tmp_path / f"{name}.png"
    Image.new("RGB", (20, 30), color).save(path)
    return Drawing("tuxpaint", f"tuxpaint/{name}", ("bitmap", str(path)), "t", name, "GPL-2", {})


def test_write_plan_dedupes_eval_images_and_resumes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    same = png_drawing(src, "shared", (200, 10, 10))
    twin = png_drawing(src, "twin", (200, 10, 10))  # same pixels, different file
    others = [png_drawing(src, f"o{i}", (i * 20, 100, 50)) for i in range(7)]
    broken = Drawing(
        "tuxpaint", "tuxpaint/broken", ("bitmap", str(src / "missing.png")), "t", "b", "GPL-2", {}
    )
    plan = Plan(
        parts={
            "eval/tux": [Entry("e0", same, "a red thing", {"labels": {}})],
            "pool": [Entry(f"p{i}", d, f"pool {i}", {}) for i, d in enumerate([twin, *others, broken])],
            "curated": [Entry("c0", others[0], "clean", {})],
        },
        suites={"tux": {"classes": {}, "templates": [], "tasks": ["retrieval"]}},
    )
    out = tmp_path / "out"
    cfg = BuildConfig(size=16, shard_size=3, workers=1)
    manifests = write_plan(out, cfg, plan)
    assert manifests["pool"]["count"] == 7
    assert manifests["pool"]["skipped"] == {"same_image_as_eval": 1, "render_error": 1}
    assert manifests["eval/tux"]["tasks"] == ["retrieval"]
    assert not list(out.rglob("*.tmp"))
    keys = [k for b in SuperBatchStream(out / "pool", batch_size=100, shuffle_shards=False) for k in b.keys]
    assert keys == [f"p{i}" for i in range(1, 8)]
    (batch,) = SuperBatchStream(out / "pool", batch_size=100, shuffle_shards=False)
    assert batch.images.shape == (7, 3, 16, 16)

    # resume: a finished shard is kept as is, a missing one is written again
    first, second = out / "pool" / "00000.tar", out / "pool" / "00001.tar"
    before = first.stat().st_mtime_ns
    second.unlink()
    again = write_plan(out, cfg, plan)
    assert first.stat().st_mtime_ns == before and second.exists()
    assert again["pool"]["count"] == 7
    assert json.loads((out / "pool" / "manifest.json").read_text())["count"] == 7


def test_svg_with_physical_units_renders(tmp_path):
    path = tmp_path / "pt.svg"
    path.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="72pt" height="36pt" viewBox="0 0 72 36">'
        '<rect x="0" y="0" width="72" height="36" fill="#ff0000"/></svg>'
    )
    image = render_svg(path, 32)
    assert image.size == (32, 32)
    assert image.getpixel((16, 16))[:3] == (255, 0, 0)  # the wide rectangle fills the middle band
    assert image.getpixel((16, 2)) == (255, 255, 255)  # white above it (aspect kept)
