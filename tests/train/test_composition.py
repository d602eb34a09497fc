"""The ground-truth composition of what a run learns on (train/composition.py): counts of a hand-made
batch, the metrics-line fields of tiny trainings on labelled shards, exact resume, two ranks' sums."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from jestclip.data import Pair, write_shard
from jestclip.data.loader import SuperBatch
from jestclip.data.quality import NOISE_KINDS
from jestclip.models import create_model
from jestclip.train import loop
from jestclip.train.composition import (
    COUNTS,
    Composition,
    batch_quality,
    composition_key,
    count_composition,
)
from jestclip.train.loop import train
from jestclip.train.reference import cache_model_embeddings

from ..data.test_loader import image
from .test_loop import config

CLEAN = {"clean": True, "clean_caption": "a cat", "noise": []}


def quality(clean: bool, *kinds: str) -> dict:
    return {"quality": {"clean": clean, "clean_caption": None, "noise": list(kinds)}}


def superbatch(meta: list[dict]) -> SuperBatch:
    n = len(meta)
    keys = [f"k{i}" for i in range(n)]
    return SuperBatch(keys, ["shard.tar"] * n, torch.zeros(n, 3, 2, 2), ["t"] * n, meta)


# six candidates: clean; swapped; unlabelled; swapped and near-blank; clean; unclean with no named kind
HAND_MADE = [
    {"quality": CLEAN},
    quality(False, "swapped"),
    {"source": "emoji"},
    quality(False, "swapped", "near_blank"),
    {"quality": CLEAN},
    quality(False),
]


def test_the_composition_of_a_hand_made_batch_and_selection():
    q = batch_quality(superbatch(HAND_MADE))
    assert q.dtype == torch.int8 and q.shape == (6, 1 + len(NOISE_KINDS))
    assert q[2].tolist() == [-1] * (1 + len(NOISE_KINDS))  # unlabelled: -1 on every column
    counts = count_composition(q, torch.tensor([1, 4, 2]))
    expected = torch.zeros(2, len(COUNTS), dtype=torch.int64)
    column = {c: i for i, c in enumerate(COUNTS)}
    for row, values in enumerate(
        (
            {"labelled": 5, "clean": 2, "swapped": 2, "near_blank": 1},  # every candidate
            {"labelled": 2, "clean": 1, "swapped": 1},  # rows 1 (swapped), 4 (clean), 2 (unlabelled)
        )
    ):
        for c, n in values.items():
            expected[row, column[c]] = n
    assert torch.equal(counts, expected)

    meter = Composition()
    meter.add(q, torch.tensor([1, 4, 2]))
    line = meter.line()
    assert line["candidates/labelled"] == 5 and line["learned/labelled"] == 2
    assert line["candidates/clean"] == pytest.approx(0.4) and line["learned/clean"] == pytest.approx(0.5)
    assert line["candidates/noise/swapped"] == pytest.approx(0.4)
    assert line["learned/noise/swapped"] == pytest.approx(0.5)
    assert line["candidates/noise/near_blank"] == pytest.approx(0.2) and line["learned/noise/near_blank"] == 0
    assert len(line) == 2 * len(COUNTS)  # every kind, zero or not
    assert meter.line() == {}  # the sums start again after a line


def test_a_line_pools_the_steps_since_the_previous_one():
    meter = Composition()
    meter.add(batch_quality(superbatch(HAND_MADE)), torch.tensor([0, 2]))  # 2 of 5 clean; learned 1 of 1
    meter.add(batch_quality(superbatch([{"quality": CLEAN}])), torch.tensor([0]))  # 1 of 1; learned 1 of 1
    line = meter.line()
    assert line["candidates/labelled"] == 6 and line["candidates/clean"] == pytest.approx(3 / 6)  # not 0.7
    assert line["learned/labelled"] == 2 and line["learned/clean"] == 1.0
    meter.add(batch_quality(superbatch(HAND_MADE)), torch.tensor([2]))  # learned only an unlabelled sample
    line = meter.line()
    assert line["learned/labelled"] == 0 and line["learned/clean"] is None
    assert line["candidates/clean"] == pytest.approx(0.4)


def test_without_labels_nothing_is_counted():
    assert batch_quality(superbatch([{"source": "emoji"}, {}])) is None
    meter = Composition()
    meter.add(None, torch.tensor([0]))
    assert meter.line() == {} and meter.state_dict() is None


def test_keys_and_state():
    assert composition_key("learned", "clean") == "learned/clean"
    assert composition_key("candidates", "swapped") == "candidates/noise/swapped"
    assert composition_key("learned", "labelled") == "learned/labelled"
    with pytest.raises(ValueError, match="row must be one of"):
        composition_key("chosen", "clean")
    meter = Composition()
    meter.add(batch_quality(superbatch(HAND_MADE)), torch.tensor([1, 4]))
    state = json.loads(json.dumps(meter.state_dict()))  # plain numbers, by name
    assert state["candidates"]["labelled"] == 5 and state["learned"]["swapped"] == 1
    restored = Composition()
    restored.load_state_dict(state)
    assert restored.line() == meter.line()
    with pytest.raises(ValueError, match=r"unknown columns \['mystery'\]"):
        restored.load_state_dict({"candidates": {"mystery": 1}, "learned": {}})


def test_a_malformed_entry_names_its_shard_and_key():
    batch = superbatch([{"quality": CLEAN}, {"quality": {"clean": "yes"}}])
    with pytest.raises(ValueError, match=r"^shard\.tar: sample 'k1': 'quality' must be an object"):
        batch_quality(batch)


def rule(shard: int, i: int) -> dict:
    """Sample ``i`` of shard ``shard``: clean, swapped, unclean non-English and near-blank, or unlabelled."""
    return [
        {"quality": CLEAN},
        quality(False, "swapped"),
        quality(False, "non_english", "near_blank"),
        {},
    ][(3 * shard + i) % 4]


def labelled_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """Generated shards whose JSON carries ``rule(shard, i)``, a micro reference's embeddings cached."""
    urls = []
    for s in range(n_shards):
        pairs = [
            Pair(f"s{s}_{i:03d}", image(s * per_shard + i), f"text {s} {i}", rule(s, i))
            for i in range(per_shard)
        ]
        path = root / f"{s:05d}.tar"
        root.mkdir(parents=True, exist_ok=True)
        assert write_shard(path, pairs) == per_shard
        urls.append(str(path))
    torch.manual_seed(1)
    cache_model_embeddings(create_model("jest-micro"), "jest-micro", urls)
    return urls


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> list[str]:
    return labelled_shards(tmp_path_factory.mktemp("labelled"), 2, 12)


def metrics(run_dir: str) -> list[dict]:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "wall_s"} for x in lines]


def expected_line(steps: list[tuple[list[str], list[int]]]) -> dict:
    """The composition fields of a line over ``steps`` (each: the candidates' keys, the learned indices),
    counted directly from the labelling rule."""

    def labels(key: str) -> dict | None:
        shard, i = (int(part) for part in key[1:].split("_"))
        return rule(shard, i).get("quality")

    fields = {}
    rows = {
        "candidates": [k for keys, _ in steps for k in keys],
        "learned": [keys[j] for keys, selected in steps for j in selected],
    }
    for row, keys in rows.items():
        entries = [labels(k) for k in keys]
        entries = [e for e in entries if e is not None]
        fields[f"{row}/labelled"] = len(entries)
        fields[f"{row}/clean"] = sum(e["clean"] for e in entries) / len(entries)
        for kind in NOISE_KINDS:
            fields[f"{row}/noise/{kind}"] = sum(kind in e["noise"] for e in entries) / len(entries)
    return fields


@pytest.mark.parametrize("method", ["iid", "jest", "independent", "flexi-jest", "drrho"])
def test_the_metrics_line_gives_the_composition_of_every_step_it_reports(
    tmp_path, labelled, method, monkeypatch
):
    steps = record_steps(monkeypatch)
    cfg = dataclasses.replace(config(tmp_path / method, labelled, method, steps=3), log_every=2)
    train(cfg, progress=False)
    lines = metrics(cfg.run_dir)
    assert [x["step"] for x in lines] == [2, 3]
    for line, covered in zip(lines, (steps[:2], steps[2:]), strict=True):
        want = expected_line(covered)
        assert {k: line[k] for k in want} == pytest.approx(want)
        if method in ("iid", "drrho"):  # learned on the batch as drawn
            assert all(line[k] == line[k.replace("learned/", "candidates/")] for k in want if "learned/" in k)


def test_runs_without_labels_log_no_composition(tmp_path):
    from .test_loop import cached_shards

    shards = cached_shards(tmp_path / "plain", 1, 8)
    cfg = config(tmp_path / "run", shards, "jest", steps=2)
    train(cfg, progress=False)
    for line in metrics(cfg.run_dir):
        assert not [k for k in line if k.startswith(("learned/", "candidates/"))]


def test_a_resumed_run_logs_the_lines_of_an_uninterrupted_one(tmp_path, labelled):
    """Lines every 2 steps, checkpoints every 3: the run stopped at step 3 resumes with step 3's counts, so
    its step-4 line covers steps 3 and 4 as the uninterrupted run's does."""

    def cfg(name: str, **kw):
        c = config(tmp_path / name, labelled, "jest", steps=6, checkpoint_every=3, **kw)
        return dataclasses.replace(c, log_every=2)

    train(cfg("whole"), progress=False)
    train(cfg("parts", stop_after=3), progress=False)
    train(cfg("parts"), progress=False)
    whole, parts = metrics(cfg("whole").run_dir), metrics(cfg("parts").run_dir)
    assert [x["step"] for x in whole] == [2, 4, 6] and "learned/clean" in whole[1]
    assert whole == parts


def record_steps(monkeypatch) -> list[tuple[list[str], list[int]]]:
    """Every step's candidate keys and learned indices, as the loop trains (``monkeypatch`` may be None)."""
    steps: list[tuple[list[str], list[int]]] = []
    to_device, run_step = loop.to_device, loop.run_step

    def recording_to_device(batch, *args, **kwargs):
        steps.append((batch.keys, []))
        return to_device(batch, *args, **kwargs)

    def recording_run_step(*args, **kwargs):
        out = run_step(*args, **kwargs)
        steps[-1] = (steps[-1][0], out.selected.tolist())
        return out

    patch = monkeypatch.setattr if monkeypatch is not None else setattr
    patch(loop, "to_device", recording_to_device)
    patch(loop, "run_step", recording_run_step)
    return steps


def _train_worker(rank: int, store: str, out: str, cfg) -> None:
    from .test_distributed import process_group

    with process_group(rank, store):
        steps = record_steps(None)  # a spawned process of its own
        train(cfg, progress=False)
        Path(f"{out}.{rank}").write_text(json.dumps(steps))


def test_two_ranks_log_the_composition_summed_over_ranks(tmp_path, labelled):
    cfg = config(tmp_path / "run", labelled, "jest", steps=2)
    out = str(tmp_path / "steps")
    mp.spawn(_train_worker, args=(str(tmp_path / "store"), out, cfg), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    lines = metrics(cfg.run_dir)
    for step, line in enumerate(lines):  # B = 8 candidates, 4 per rank; b = 4 learned, 2 per rank
        assert all(len(r[step][0]) == 4 and len(r[step][1]) == 2 for r in ranks)
        want = expected_line([r[step] for r in ranks])  # both ranks' (rank 0's alone differs)
        assert want != expected_line([ranks[0][step]])
        assert {k: line[k] for k in want} == pytest.approx(want)
