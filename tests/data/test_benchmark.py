"""Benchmark planning rules and the shard writer, on synthetic drawings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from jestclip.benchmark.builder import (
    BuildConfig,
    EnglishWords,
    Entry,
    Plan,
    _plan_emoji,
    _plan_icons,
    _plan_openclipart,
    _plan_tuxpaint,
    write_plan,
)
from jestclip.benchmark.catalog import Drawing
from jestclip.benchmark.render import render_svg
from jestclip.cli import main
from jestclip.data import SuperBatchStream

WORDS = "red apple fruit food a drawing of the blue bird animal cut edit icon sun moon water ski mail sent"


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


def quality_of(entries: list[Entry]) -> dict[str, tuple[bool, str | None, list[str]]]:
    """The last part of each pool entry's uid -> its (clean, clean_caption, noise)."""
    return {e.drawing.uid.split("/")[-1]: tuple(e.meta["quality"].values()) for e in entries}


def test_openclipart_pool_quality(english):
    drawings = [
        clipart("a", "Red apple", ["fruit", "unsorted", "red apple"]),  # passes, nothing named: clean
        clipart("b", "Mela rossa", ["fruit"]),  # Italian title
        clipart("c", "Tigre01", ["animal"]),  # file-name-like title
        clipart("d", "Red apple", []),  # no keyword at all
        clipart(
            "e", "gramastar", ["fruit"], description="a blue bird"
        ),  # passes, but the title is boilerplate
        clipart("f", "Red apple", ["mela"]),  # its only specific keyword is not English
        clipart("h", "Red apple", ["fruit"], description="una mela rossa"),  # passes; Italian description
        clipart("i", "", ["fruit"]),  # no title, no description: fails, no kind names why
    ] + [clipart(f"g{i}", "gramastar", ["food"]) for i in range(10)]
    out = new_plan()
    _plan_openclipart(
        drawings, drawings, BuildConfig(heldout_fraction=0.0, generic_keyword=0.5), english, out
    )
    q = quality_of(out.parts["pool"])
    assert q["a"] == (True, "Red apple, fruit", [])
    assert q["b"] == (False, None, ["non_english"])
    assert q["c"] == (False, None, ["filename_title"])
    assert q["d"] == (False, None, ["generic_keywords"])
    assert q["e"] == (False, "a blue bird, fruit", ["boilerplate_title"])
    assert q["f"] == (False, None, ["non_english"])
    assert q["h"] == (False, "Red apple, fruit", ["non_english"])
    assert q["i"] == (False, None, [])
    assert q["g0"] == (False, None, ["boilerplate_title", "generic_keywords"])  # "food" is generic here
    curated = {e.drawing.uid.split("/")[1]: e.text for e in out.parts["curated"]}
    assert all(q[uid][1] == text for uid, text in curated.items())  # the clean caption is the curated one


def test_icon_pool_quality(english):
    themes = ["Papirus", "Numix", "Moka", "Faba", "Paper"]
    drawings = [icon(t, "edit-cut", aliases=["gtk-cut"]) for t in themes]
    drawings += [icon(t, "amarok-clock") for t in themes]  # semantic, not English
    drawings += [icon(t, "gnome-mailer", aliases=["mail-sent"]) for t in themes]  # semantic alias
    drawings += [icon("Papirus", "nm-vpn-connecting06"), icon("Papirus", "application-x-foo")]
    drawings += [icon("Numix", "cut-edit")]  # English words, one theme: not a semantic name
    out = new_plan()
    _plan_icons(
        drawings, drawings, BuildConfig(semantic_themes=5, curated_icon_themes=("Papirus",)), english, out
    )
    q = {(e.drawing.style, e.text): e.meta["quality"] for e in out.parts["pool"]}
    assert len(q) == len(out.parts["pool"])

    def row(theme, name):
        entry = q[(theme, name)]
        return entry["clean"], entry["clean_caption"], entry["noise"]

    # every training theme is judged by the quality filters, not only the curated themes
    for theme in ("Papirus", "Numix"):
        assert row(theme, "edit-cut") == (True, "edit cut icon", [])
        assert row(theme, "gtk-cut") == (False, "edit cut icon", ["legacy_prefix", "alias_repeat"])
        assert row(theme, "mail-sent") == (True, "mail sent icon", [])
        assert row(theme, "gnome-mailer") == (False, "mail sent icon", ["legacy_prefix", "alias_repeat"])
        assert row(theme, "amarok-clock") == (False, None, ["non_english"])
    assert row("Papirus", "nm-vpn-connecting06") == (False, None, ["numbered_name"])
    assert row("Papirus", "application-x-foo") == (False, None, ["mime_type"])
    assert row("Numix", "cut-edit") == (False, None, ["rare_name"])
    assert sorted(e.text for e in out.parts["curated"]) == ["edit cut icon", "mail sent icon"]


def emoji(style: str, name: str, cldr: str, skin_tone: bool = False, shortname: str | None = None):
    fields = {
        "unicode_name": name,
        "cldr_name": cldr,
        "cldr_keywords": [cldr, "face"],
        "group": "g",
        "subgroup": "s",
        "skin_tone": skin_tone,
    }
    if shortname is not None:
        fields["shortname"] = shortname
    return Drawing("emoji", f"emoji/{style}/{cldr}", ("glyph", "f", "x"), style, cldr, "OFL", fields)


def test_emoji_pool_quality():
    drawings = [
        emoji("noto", "GRINNING FACE", "grinning face"),  # the Unicode name is the CLDR name: clean
        emoji("noto", "MAN ZERO WIDTH JOINER PERSONAL COMPUTER", "man technologist"),
        emoji(
            "noto",
            "WAVING HAND SIGN EMOJI MODIFIER FITZPATRICK TYPE-3",
            "waving hand: medium-light skin tone",
            True,
        ),
        emoji("emojione", "GHOST", "ghost", shortname=":ghost:"),
        emoji("emojione", "HOT DOG", "hot dog", shortname=":hotdog:"),
    ]
    out = new_plan()
    _plan_emoji(drawings, drawings, BuildConfig(), out)
    q = {e.text: tuple(e.meta["quality"].values()) for e in out.parts["pool"]}
    assert q == {
        "GRINNING FACE": (True, "grinning face emoji, face", []),
        "MAN ZERO WIDTH JOINER PERSONAL COMPUTER": (
            False,
            "man technologist emoji, face",
            ["raw_unicode_name"],
        ),
        "WAVING HAND SIGN EMOJI MODIFIER FITZPATRICK TYPE-3": (
            False,
            None,
            ["raw_unicode_name", "skin_tone_repeat"],
        ),
        ":ghost:": (True, "ghost emoji, face", []),
        ":hotdog:": (False, "hot dog emoji, face", ["shortname"]),
    }


def test_tuxpaint_pool_quality():
    captions = {"en": "A frog.", "en_GB": "A frog.", "fr": "Une grenouille."}
    drawings = [
        Drawing(
            "tuxpaint",
            f"tuxpaint/s{i}",
            ("bitmap", "x.png"),
            "tuxpaint",
            "s",
            "GPL-2",
            {"captions": captions},
        )
        for i in range(40)
    ]
    out = new_plan()
    _plan_tuxpaint(drawings, drawings, BuildConfig(heldout_fraction=0.0), out)
    by_language = {e.meta["language"]: tuple(e.meta["quality"].values()) for e in out.parts["pool"]}
    assert by_language == {
        "en": (True, "A frog.", []),
        "en_GB": (True, "A frog.", []),  # an English locale is English
        "fr": (False, "A frog.", ["non_english"]),
    }


def test_near_blank_pool_renders_are_marked_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    blank, inked = png_drawing(src, "blank", (255, 255, 255)), png_drawing(src, "inked", (10, 10, 10))
    clean = {"clean": True, "clean_caption": "A frog.", "noise": []}
    foreign = {"clean": False, "clean_caption": "A frog.", "noise": ["non_english"]}
    plan = Plan(
        parts={
            "pool": [
                Entry("p0", blank, "A frog.", {"source": "tuxpaint", "quality": clean}),
                Entry("p1", blank, "Une grenouille.", {"source": "tuxpaint", "quality": foreign}),
                Entry("p2", inked, "A frog.", {"source": "tuxpaint", "quality": clean}),
            ],
            "curated": [Entry("c0", blank, "A frog.", {})],
        },
        suites={},
    )
    out = tmp_path / "out"
    manifests = write_plan(out, BuildConfig(size=16, shard_size=2, workers=1), plan)
    (batch,) = SuperBatchStream(out / "pool", batch_size=10, shuffle_shards=False)
    written = {k: m["quality"] for k, m in zip(batch.keys, batch.meta, strict=True)}
    assert written == {
        "p0": {"clean": False, "clean_caption": None, "noise": ["near_blank"]},
        "p1": {"clean": False, "clean_caption": None, "noise": ["non_english", "near_blank"]},
        "p2": clean,
    }
    assert manifests["curated"]["skipped"] == {"blank": 1} and "composition" not in manifests["curated"]
    assert manifests["pool"]["composition"] == {
        "all": {
            "pairs": 3,
            "labelled": 3,
            "clean": 1,
            "unclean_unnamed": 0,
            "non_english": 1,
            "near_blank": 2,
        },
        "tuxpaint": {
            "pairs": 3,
            "labelled": 3,
            "clean": 1,
            "unclean_unnamed": 0,
            "non_english": 1,
            "near_blank": 2,
        },
    }
    assert main(["data", "inspect", str(out / "pool"), "--examples", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "composition of " + str(out / "pool") + ": 3 of 3 pairs labelled"
    rows = {line.split()[0]: line.split()[1:] for line in printed[3:]}
    assert rows["clean"] == ["1", "33.3%", "1", "33.3%"]
    assert rows["near_blank"] == ["2", "66.7%", "2", "66.7%"]
    assert rows["unclean_unnamed"] == ["0", "0.0%", "0", "0.0%"]
    assert "swapped" not in rows  # kinds nobody carries are left out


def test_a_build_written_before_ground_truth_is_not_resumed(tmp_path):
    from dataclasses import asdict

    from jestclip.benchmark import SourcePaths, build

    cfg, paths = BuildConfig(limit=5), SourcePaths()
    config = {**asdict(cfg), "paths": {k: str(v) for k, v in asdict(paths).items()}}  # no "format": 1
    (tmp_path / "build.json").write_text(json.dumps({"config": config, "complete": False}))
    with pytest.raises(ValueError, match=r"different config \(\['format'\]\)"):
        build(tmp_path, cfg, paths)


def test_render_workers_take_sigterms_default_action_under_the_cli_handler():
    """``jestclip``'s SIGTERM handler ignores the signal outside its main process, and leaving a Pool's
    ``with`` stops its workers with SIGTERM: a render worker restores the default action (a demo build once
    hung in ``Pool.terminate``, joining a worker that ignored it)."""
    code = (
        "import multiprocessing, os, signal\n"
        "from jestclip.benchmark import builder\n"
        "from jestclip.commands.common import terminate\n"
        "def default():\n"
        "    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n"
        "signal.signal(signal.SIGTERM, terminate(os.getpid()))\n"
        "ctx = multiprocessing.get_context('fork')\n"
        "with ctx.Pool(1, initializer=builder._init_worker, initargs=(frozenset(),)) as pool:\n"
        "    print(pool.apply(default))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", (done.stdout, done.stderr[-500:])
