"""A run survives what a week of training brings: divergence, full disks, corrupt checkpoints, SIGTERM at any
moment, a moved run directory, a re-cached reference; tiny runs on generated shards."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import stat
import tarfile
from pathlib import Path

import pytest
import torch

import jestclip.train.loop as loop
import jestclip.train.startup as startup
from jestclip.models import (
    create_model,
    model_fingerprint,
)
from jestclip.train.loop import CheckpointWriteError, Preempted, TrainingDiverged, train
from jestclip.train.optim import OptimConfig
from jestclip.train.reference import cache_model_embeddings
from jestclip.train.rundir import NonFiniteStateError, RunDir, atomic_save

from ..data.test_loader import image, make_shards
from .test_loop import cached_shards, config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return cached_shards(tmp_path_factory.mktemp("shards"), 2, 12)


def metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def finite(state) -> bool:
    tensors = [t for t in state["model"].values() if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --- a damaged reference cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["drrho", "jest"])
def test_a_damaged_reference_cache_is_named_at_the_first_step_not_taken_for_divergence(tmp_path, method):
    """Four rows of a sidecar set to NaN after it was written: DRRho skipped 4 of 6 updates and ended with
    "training diverged: non-finite loss" (pointing at the learning rate); JEST only warned."""
    from ..data.test_refcache import damage_rows

    urls = cached_shards(tmp_path / "shards", 2, 12)
    damage_rows(urls[1], [0, 3, 5, 7])
    cfg = config(tmp_path / "run", urls, method, steps=6, max_bad_steps=3)
    with pytest.raises(ValueError) as caught:
        train(cfg, progress=False)
    assert re.fullmatch(
        r"the cached 'reference' embedding of sample key 's1_0\d\d' of shard .*/00001\.tar is not finite "
        r"\(\d+ of \d+ in this lookup\): .*/00001\.reference\.emb\.npy was damaged after it was written; "
        r"run `jestclip cache-reference` on the shard to rewrite it \(it repairs damaged sidecars\)",
        str(caught.value),
    ), str(caught.value)
    assert not isinstance(caught.value, TrainingDiverged)
    assert all(line["skipped_updates"] == 0 for line in metrics(cfg.run_dir))  # no step trained on NaN


# --- divergence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["iid", "jest"])
def test_a_diverging_run_stops_and_names_the_last_good_checkpoint(tmp_path, shards, method):
    cfg = config(
        tmp_path / method,
        shards,
        method,
        steps=30,
        checkpoint_every=1,
        max_bad_steps=3,
        optim=OptimConfig(lr=1e6),
    )
    with pytest.raises(TrainingDiverged) as caught:
        train(cfg, progress=False)
    message = str(caught.value)
    found = re.fullmatch(
        r"training diverged: (.+) at steps (\d+)-(\d+) \(3 in a row, max_bad_steps=3\); "
        r"last good checkpoint: (\S+) \(step (\d+)\)",
        message,
    )
    assert found, message
    first, last, good = int(found[2]), int(found[3]), int(found[5])
    assert last == first + 2 and good == first - 1
    run = RunDir(cfg.run_dir)
    assert found[4] == str(run.checkpoint_path(good)) and run.latest_checkpoint() == run.checkpoint_path(good)
    assert finite(torch.load(found[4], weights_only=True)) and not run.model_file.exists()
    bad = [x for x in metrics(cfg.run_dir) if x["step"] >= first]
    assert [x["skipped_updates"] for x in bad] == [1, 2, 3] and all(x["loss"] is None for x in bad)


def test_transient_non_finite_steps_skip_their_updates_and_the_run_goes_on(
    tmp_path, shards, monkeypatch, capsys
):
    steps = iter(range(1, 100))

    def bad_steps_2_and_4(*args, **kw):
        out = run_step(*args, **kw)
        step = next(steps)
        if step == 2:
            out.loss = out.loss + float("inf")  # the loss alone: its gradients stay finite
        if step == 4:
            out.loss.register_hook(lambda grad: grad * float("nan"))  # the gradients alone
        return out

    run_step = loop.run_step
    monkeypatch.setattr(loop, "run_step", bad_steps_2_and_4)
    cfg = config(tmp_path / "run", shards, "iid", steps=5, max_bad_steps=2)
    last = train(cfg, progress=False)
    assert last["skipped_updates"] == 2 and last["step"] == 5
    lines = metrics(cfg.run_dir)
    assert [(x["loss"] is None, x["grad_norm"] is None) for x in lines[1::2]] == [
        (True, False),
        (False, True),
    ]
    assert lines[1]["examples_learned"] == lines[0]["examples_learned"]  # nothing learned on a skipped step
    err = capsys.readouterr().err
    assert "step 2: non-finite loss; update skipped (1 in a row" in err
    assert "step 4: non-finite gradient norm; update skipped (1 in a row" in err  # not in a row: no stop
    state = torch.load(RunDir(cfg.run_dir).latest_checkpoint(), weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {3.0} and state["scheduler"]["last_epoch"] == 5  # 3 updates, the schedule went on
    assert state["counters"]["skipped_updates"] == 2


def test_non_finite_weights_are_never_written(tmp_path, shards, monkeypatch):
    def poison_after_step_2(state, *args, **kw):
        learned = learn(state, *args, **kw)
        if state.counters.step == 1:  # the second step (counted after learn returns)
            with torch.no_grad():
                state.model.visual.conv1.weight.fill_(float("inf"))
        return learned

    learn = loop.learn
    monkeypatch.setattr(loop, "learn", poison_after_step_2)
    cfg = config(tmp_path / "run", shards, "iid", steps=5, checkpoint_every=1)
    run = RunDir(cfg.run_dir)
    with pytest.raises(
        TrainingDiverged, match=r"refusing to write .*checkpoint-000002\.pt: model\.visual\.conv1"
    ):
        train(cfg, progress=False)
    assert run.checkpoints() == [run.checkpoint_path(1)] and not list(run.path.glob("*.tmp"))
    with pytest.raises(NonFiniteStateError, match="weight holds non-finite values"):
        run.save_weights({"weight": torch.tensor([1.0, float("nan")])})
    assert not run.model_file.exists()


@pytest.mark.parametrize(
    ("method", "reason"), [("iid", "non-finite loss"), ("jest", "non-finite learner embeddings")]
)
def test_weights_whose_forward_overflows_are_bad_steps(tmp_path, shards, monkeypatch, method, reason):
    def huge_after_step_2(state, *args, **kw):
        learned = learn(state, *args, **kw)
        if state.counters.step == 1:
            with torch.no_grad():
                state.model.visual.conv1.weight.fill_(1e38)  # finite, but the forward overflows
        return learned

    learn = loop.learn
    monkeypatch.setattr(loop, "learn", huge_after_step_2)
    cfg = config(tmp_path / "run", shards, method, steps=8, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match=f"^training diverged: {reason} at steps 3-5 "):
        train(cfg, progress=False)


# --- checkpoints ----------------------------------------------------------------------------------------


def test_atomic_save_flushes_the_file_and_its_directory(tmp_path, monkeypatch):
    synced: list[bool] = []  # per fsync: whether it was a directory
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert synced == [False, True]  # the file before the rename, the directory after it
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.ones(2))


def tensorboard_scalars(run_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) of ``tag`` the run's event files hold, as stored (no purging of orphaned data)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted((Path(run_dir) / "tb").glob("*tfevents*")):
        acc = EventAccumulator(str(path), purge_orphaned_data=False)
        acc.Reload()
        steps += [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
    return steps


def test_tensorboard_holds_each_step_once_after_a_crash_and_resume(tmp_path, shards):
    """Killed at step 7 with its checkpoint at step 4: TensorBoard held steps 5-7 twice (``wall_s`` going
    backwards) while metrics.jsonl held each step once."""
    cfg = config(tmp_path / "run", shards, "iid", steps=9, checkpoint_every=4, stop_after=7)
    train(cfg, progress=False)
    run = RunDir(cfg.run_dir)
    run.checkpoint_path(7).unlink()  # as if killed after step 7: the last checkpoint is step 4
    with open(next(run.tensorboard_dir.glob("*tfevents*")), "ab") as f:
        f.write(b"\x10\x00\x00")  # and a record cut short by the kill
    assert [s for s, _ in tensorboard_scalars(cfg.run_dir, "loss")] == list(range(1, 8))
    train(dataclasses.replace(cfg, stop_after=None), progress=False)
    lines = metrics(cfg.run_dir)
    for tag in ("loss", "wall_s", "examples_learned"):
        logged = tensorboard_scalars(cfg.run_dir, tag)
        assert [s for s, _ in logged] == list(range(1, 10)), tag
        assert [v for _, v in logged] == pytest.approx([line[tag] for line in lines]), (
            tag
        )  # the resumed run's
    assert run.truncate_tensorboard(9) == []  # nothing beyond the last step: no file rewritten


def test_the_newest_checkpoints_are_kept_and_read_through_rundir(tmp_path, shards):
    cfg = config(
        tmp_path / "run", shards, "iid", steps=5, stop_after=4, checkpoint_every=1, keep_checkpoints=2
    )
    train(cfg, progress=False)
    run = RunDir(cfg.run_dir)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-000004.pt", "checkpoint-000003.pt"]
    assert run.weights() == run.latest_checkpoint() == run.checkpoint_path(4)
    assert run.load_checkpoint(torch.device("cpu"))["counters"]["step"] == 4
    train(dataclasses.replace(cfg, stop_after=None, keep_checkpoints=1), progress=False)  # resumable change
    assert run.checkpoints() == [run.checkpoint_path(5)] and run.weights() == run.model_file


def test_a_run_directory_from_before_numbered_checkpoints_still_reads(tmp_path):
    run = RunDir(tmp_path)
    torch.save({"counters": {"step": 7}}, tmp_path / "checkpoint.pt")
    assert run.latest_checkpoint() == run.weights() == tmp_path / "checkpoint.pt"
    run.save_checkpoint({"counters": {"step": 8}}, keep=2)
    assert run.checkpoints() == [run.checkpoint_path(8), tmp_path / "checkpoint.pt"]
    run.save_checkpoint({"counters": {"step": 9}}, keep=2)
    assert run.checkpoints() == [run.checkpoint_path(9), run.checkpoint_path(8)]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, shards):
    whole = config(tmp_path / "whole", shards, "iid", steps=5)
    train(whole, progress=False)
    cfg = config(tmp_path / "run", shards, "iid", steps=5, stop_after=4, checkpoint_every=2)
    train(cfg, progress=False)
    run = RunDir(cfg.run_dir)
    newest = run.checkpoint_path(4)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with (run.metrics_file).open("a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill
    with (
        pytest.warns(RuntimeWarning, match=rf"checkpoint {re.escape(str(newest))} does not load .*step 2\)"),
        pytest.warns(UserWarning, match=r"metrics.jsonl:5: dropped a line that is not a metrics line"),
    ):
        train(dataclasses.replace(cfg, stop_after=None), progress=False)
    assert newest.with_name(newest.name + ".corrupt").exists()
    a = torch.load(Path(whole.run_dir) / "model.pt", weights_only=True)
    b = torch.load(run.model_file, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed exactly from step 2
    assert [x["step"] for x in metrics(cfg.run_dir)] == [1, 2, 3, 4, 5]  # each step once


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_the_run(tmp_path, shards, monkeypatch, failing):
    import jestclip.train.rundir as rundir

    calls = iter(range(100))
    real_save, real_replace = torch.save, os.replace

    def full_save(obj, f, *args, **kw):
        if next(calls) == 0:
            return real_save(obj, f, *args, **kw)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_replace(src, dst):
        if str(src).endswith(".pt.tmp") and next(calls) > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    if failing == "torch.save":
        monkeypatch.setattr(rundir.torch, "save", full_save)
    else:
        monkeypatch.setattr(rundir.os, "replace", full_replace)
    cfg = config(tmp_path / "run", shards, "iid", steps=5, checkpoint_every=2)
    run = RunDir(cfg.run_dir)
    expected = (
        f"checkpoint: no space left on device writing {run.checkpoint_path(4)}; "
        f"previous checkpoint {run.checkpoint_path(2)} (step 2) kept"
    )
    with pytest.raises(CheckpointWriteError, match=f"^{re.escape(expected)}$"):
        train(cfg, progress=False)
    assert run.checkpoints() == [run.checkpoint_path(2)] and not list(run.path.glob("*.tmp"))
    assert torch.load(run.checkpoint_path(2), weights_only=True)["counters"]["step"] == 2
    monkeypatch.undo()
    assert train(cfg, progress=False)["step"] == 5  # space freed: the rerun resumes from step 2


def test_leftover_tmp_files_are_removed_when_a_run_starts(tmp_path, shards):
    cfg = config(tmp_path / "run", shards, "iid", steps=1)
    Path(cfg.run_dir).mkdir()
    for name in ("checkpoint-000002.pt.tmp", "config.json.tmp"):
        (Path(cfg.run_dir) / name).write_bytes(b"half a file")
    train(cfg, progress=False)
    assert not list(Path(cfg.run_dir).glob("*.tmp"))


# --- signals, resume hygiene ----------------------------------------------------------------------------


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that train() does not handle fails the test instead of killing pytest."""

    def unhandled(*_):
        raise AssertionError("SIGTERM reached the test's handler: train() did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def sigterm_during(monkeypatch, name: str) -> list[str]:
    """Send this process SIGTERM when ``startup.NAME`` is called, then call it; the list says whether it
    ran."""
    real, ran = getattr(startup, name), []

    def with_sigterm(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        ran.append(name)
        return real(*args, **kw)

    monkeypatch.setattr(startup, name, with_sigterm)
    return ran


@pytest.mark.parametrize("during", ["open_reference", "Evaluator"])
def test_sigterm_while_starting_stops_at_once(tmp_path, shards, monkeypatch, sigterm_guard, during):
    from ..eval.test_evaluate import make_suite

    make_suite(tmp_path / "bench" / "eval", "toy", per_class=3)
    cfg = config(tmp_path / "run", shards, "jest", steps=5, eval_data=str(tmp_path / "bench"))
    ran = []
    if during == "Evaluator":
        monkeypatch.setattr(
            loop.Evaluator, "due", lambda self, step: not os.kill(os.getpid(), signal.SIGTERM)
        )
        monkeypatch.setattr(loop, "evaluate", lambda *args, **kw: ran.append("evaluate"))
    else:
        ran = sigterm_during(monkeypatch, during)
    with pytest.raises(
        Preempted, match=r"^preempted at step 0 while starting; no checkpoint yet; rerun the same"
    ):
        train(cfg, progress=False)
    assert ran == []  # stopped at once: what was starting did not go on
    run = RunDir(cfg.run_dir)
    assert run.checkpoints() == [] and not (run.metrics_file.exists() and run.metrics_file.read_text())


def test_sigterm_checkpoints_and_raises_preempted_and_a_rerun_resumes(
    tmp_path, shards, monkeypatch, sigterm_guard
):
    def sigterm_at_step_2(state, *args, **kw):
        if state.counters.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return learn(state, *args, **kw)

    learn = loop.learn
    monkeypatch.setattr(loop, "learn", sigterm_at_step_2)
    cfg = config(tmp_path / "run", shards, "iid", steps=4)
    run = RunDir(cfg.run_dir)
    expected = f"preempted at step 2; checkpoint {run.checkpoint_path(2)}; rerun the same command to resume"
    with pytest.raises(Preempted, match=f"^{re.escape(expected)}$"):
        train(cfg, progress=False)
    assert not run.model_file.exists()
    monkeypatch.undo()
    sigterm_during(monkeypatch, "open_reference")  # preempted again while resuming: nothing new to save
    with pytest.raises(
        Preempted, match=re.escape(f"at step 2 while starting; checkpoint {run.checkpoint_path(2)}")
    ):
        train(cfg, progress=False)
    monkeypatch.undo()
    assert train(cfg, progress=False)["step"] == 4
    assert [x["step"] for x in metrics(cfg.run_dir)] == [1, 2, 3, 4]


def test_a_moved_run_directory_resumes(tmp_path, shards):
    cfg = config(tmp_path / "old", shards, "iid", steps=4, stop_after=2)
    train(cfg, progress=False)
    shutil.move(cfg.run_dir, tmp_path / "new")
    moved = dataclasses.replace(cfg, run_dir=str(tmp_path / "new"), stop_after=None, max_bad_steps=5)
    assert train(moved, progress=False)["step"] == 4
    assert [x["step"] for x in metrics(moved.run_dir)] == [1, 2, 3, 4]
    assert RunDir(moved.run_dir).read_config()["run_dir"] == moved.run_dir


def test_a_killed_loader_worker_ends_the_run_in_one_line_naming_the_last_checkpoint(
    tmp_path, shards, monkeypatch
):
    """A loader worker SIGKILLed (the out-of-memory killer) ended the run in a 45-line traceback and exit 1,
    the status of "the run stopped itself"; the rerun resumed correctly, but nothing said so."""
    from torch.utils.data import get_worker_info

    from jestclip.commands.common import exit_status

    marker, real = tmp_path / "killed", startup.image_transform

    def killing(name):
        transform, seen = real(name), []

        def apply(image):
            seen.append(1)
            if get_worker_info() is not None and len(seen) == 30 and not marker.exists():
                marker.write_text("once")
                os.kill(os.getpid(), signal.SIGKILL)
            return transform(image)

        return apply

    cfg = dataclasses.replace(
        config(tmp_path / "run", shards, "iid", steps=12, checkpoint_every=2), num_workers=1
    )
    whole = dataclasses.replace(cfg, run_dir=str(tmp_path / "whole"))
    train(whole, progress=False)
    monkeypatch.setattr(startup, "image_transform", killing)
    with pytest.raises(loop.Interrupted) as caught:
        train(cfg, progress=False)
    message = str(caught.value)
    found = re.fullmatch(
        r"interrupted after step (\d+): a data loader worker \(pid \d+\) was killed by signal: Killed "
        r"\(SIGKILL: often the out-of-memory killer\); last checkpoint (\S+) \(step (\d+)\); rerun the same "
        r"command to resume",
        message,
    )
    assert found and marker.exists(), message
    run = RunDir(cfg.run_dir)
    assert Path(found[2]) == run.latest_checkpoint() and int(found[3]) == run.checkpoint_step(Path(found[2]))
    assert exit_status(caught.value) == (75, message)  # "interrupted, rerun to resume", not "stopped itself"
    monkeypatch.setattr(startup, "image_transform", real)
    assert train(cfg, progress=False)["step"] == 12  # the rerun resumes, bitwise
    a = torch.load(Path(whole.run_dir) / "model.pt", weights_only=True)
    b = torch.load(run.model_file, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_running_out_of_memory_is_one_line_naming_the_checkpoint_and_what_to_lower(
    tmp_path, shards, monkeypatch, error
):
    from jestclip.commands.common import exit_status

    real, calls = loop.run_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "run_step", step)
    cfg = config(tmp_path / "run", shards, "iid", steps=6, checkpoint_every=2)
    with pytest.raises(loop.OutOfMemory) as caught:
        train(cfg, progress=False)
    assert str(caught.value) == (
        f"out of memory after step 2 ({error.__name__}: CUDA out of memory); last checkpoint "
        f"{RunDir(cfg.run_dir).checkpoint_path(2)} (step 2); lower method.batch_size or filter_ratio (or "
        "num_workers), then rerun to resume"
    )
    assert exit_status(caught.value) == (1, str(caught.value))


# --- metrics --------------------------------------------------------------------------------------------


def test_the_metrics_line_counts_skipped_samples_per_reason(tmp_path):
    (url,) = make_shards(tmp_path / "shards", 1, 6)
    with tarfile.open(url) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = [("badimg.png", b"not a png"), ("badimg.txt", b"caption"), ("notext.png", image(1))]
    with tarfile.open(url, "w") as tar:  # the bad samples first: counted in the first super-batch
        for name, data in bad + members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = config(tmp_path / "run", [url], "iid", steps=3, reference_cache=None)
    last = train(cfg, progress=False)
    reasons = {k: v for k, v in last.items() if k.startswith("skipped/")}
    assert reasons.get("skipped/bad_image", 0) >= 1 and reasons.get("skipped/missing_text", 0) >= 1
    assert last["samples_skipped"] == sum(reasons.values()) and last["skipped_updates"] == 0


# --- the reference cache ---------------------------------------------------------------------------------


def recache(urls: list[str], seed: int) -> str:
    """Cache a micro reference model made with ``seed`` for ``urls``; its fingerprint."""
    torch.manual_seed(seed)
    reference = create_model("jest-micro")
    cache_model_embeddings(reference, "jest-micro", urls)
    return model_fingerprint(reference)


def test_resume_refuses_a_reference_cache_of_another_model(tmp_path):
    urls = make_shards(tmp_path / "shards", 1, 12)
    trained_with = recache(urls, seed=1)
    cfg = config(tmp_path / "run", urls, "jest", steps=3, stop_after=1)
    with pytest.raises(ValueError, match=f"not the expected {'0' * 40}"):
        train(dataclasses.replace(cfg, reference_fingerprint="0" * 40), progress=False)
    train(cfg, progress=False)
    assert RunDir(cfg.run_dir).read_reference()["fingerprint"] == trained_with
    now = recache(urls, seed=2)
    expected = (
        f"reference cache 'reference' now holds model jest-micro ({now[:12]})'s embeddings but this run "
        f"was trained with model jest-micro ({trained_with[:12]})'s; re-cache with jest-micro or start a "
        "new run_dir"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        train(dataclasses.replace(cfg, stop_after=None), progress=False)
    recache(urls, seed=1)
    assert train(
        dataclasses.replace(cfg, stop_after=None, reference_fingerprint=trained_with), progress=False
    )


# --- resume is bitwise for every method and approximation ---------------------------------------------------

RESUMABLE = [
    ("iid", None),
    ("jest", None),
    ("independent", None),
    ("flexi-jest", "flexi"),
    ("flexi-jest", "resolution"),
    ("flexi-jest", "patch_drop"),
    ("drrho", None),  # filter: tests/train/test_filter.py resumes it bitwise (it needs a keep list)
]


@pytest.mark.parametrize(("method", "approx"), RESUMABLE, ids=[f"{m}-{a}" if a else m for m, a in RESUMABLE])
def test_every_method_resumes_bitwise_and_draws_only_from_its_generator(
    tmp_path, shards, monkeypatch, method, approx
):
    extra = {"approx": approx} if approx else {}

    def cfg_of(name: str, **kw):
        cfg = config(tmp_path / name, shards, method, steps=4, **kw)
        return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, **extra))

    whole = cfg_of("whole")
    train(whole, progress=False)
    parts = cfg_of("parts", stop_after=2)
    train(parts, progress=False)

    def unchanged_global_rng(state, *args, **kw):  # a step draws only from the run's own generator
        before = torch.get_rng_state()
        learned = learn(state, *args, **kw)
        assert torch.equal(before, torch.get_rng_state()), "a step drew from the global torch RNG"
        return learned

    learn = loop.learn
    monkeypatch.setattr(loop, "learn", unchanged_global_rng)
    train(dataclasses.replace(parts, stop_after=None), progress=False)
    a = torch.load(Path(whole.run_dir) / "model.pt", weights_only=True)
    b = torch.load(Path(parts.run_dir) / "model.pt", weights_only=True)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after resuming, e.g. {differ[:3]}"
    strip = [{k: v for k, v in x.items() if k != "wall_s"} for x in metrics(whole.run_dir)]
    assert strip == [{k: v for k, v in x.items() if k != "wall_s"} for x in metrics(parts.run_dir)]


def test_a_resume_restores_the_global_rng_after_startup_draws(tmp_path, shards, monkeypatch):
    """A model that draws from the global RNG while training (dropout) resumes bitwise, whatever startup
    draws after the checkpoint is restored (a DataLoader's base seed, a FLOP count's forward)."""
    real = loop.learn

    def dropout_in_the_model(state, *args, **kw):  # stands in for dropout: a global draw in each step
        with torch.no_grad():
            state.model.logit_bias.add_(1e-3 * torch.rand(()))
        return real(state, *args, **kw)

    def startup_draw(*args, **kw):
        torch.rand(3)
        return measure(*args, **kw)

    measure = startup.StepCosts.measure
    monkeypatch.setattr(loop, "learn", dropout_in_the_model)
    monkeypatch.setattr(startup.StepCosts, "measure", staticmethod(startup_draw))
    whole = config(tmp_path / "whole", shards, "iid", steps=4)
    train(whole, progress=False)
    parts = config(tmp_path / "parts", shards, "iid", steps=4, stop_after=2)
    train(parts, progress=False)
    train(dataclasses.replace(parts, stop_after=None), progress=False)
    a = torch.load(Path(whole.run_dir) / "model.pt", weights_only=True)
    b = torch.load(Path(parts.run_dir) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the run's end: final checkpoint and weights before the final evaluation -----------------------------


def bench_with(root: Path, *, template: str | None = None, bad_label: bool = False) -> str:
    """A benchmark root whose one eval suite has ``template`` (and a bad label id when asked)."""
    from ..eval.test_evaluate import make_suite

    suite = make_suite(root / "eval", "toy", per_class=3, bad_label=bad_label)
    if template is not None:
        manifest = json.loads((suite / "manifest.json").read_text())
        (suite / "manifest.json").write_text(json.dumps({**manifest, "templates": ["a {}.", template]}))
    return str(root)


@pytest.mark.parametrize(
    ("template", "bad_label", "expected"),
    [
        (
            "a {} in {style} style.",
            False,
            "suite 'toy': prompt template 'a {} in {style} style.' has field(s) ['style'] besides the class "
            "name's '{}'",
        ),
        (None, True, "suite 'toy': sample 'toy_005' in "),
    ],
    ids=["second-placeholder", "label-out-of-range"],
)
def test_eval_inputs_are_checked_before_the_first_step(
    tmp_path, shards, monkeypatch, template, bad_label, expected
):
    steps = []
    monkeypatch.setattr(loop, "learn", lambda *args, **kw: steps.append(1))
    eval_data = bench_with(tmp_path / "bench", template=template, bad_label=bad_label)
    cfg = config(tmp_path / "run", shards, "iid", steps=3, eval_data=eval_data)
    with pytest.raises(ValueError, match=re.escape(expected)):
        train(cfg, progress=False)
    assert steps == [] and RunDir(cfg.run_dir).checkpoints() == []


def test_a_failing_final_evaluation_keeps_the_training_and_a_rerun_only_evaluates(
    tmp_path, shards, monkeypatch
):
    cfg = config(tmp_path / "run", shards, "iid", steps=3, eval_data=bench_with(tmp_path / "bench"))
    run = RunDir(cfg.run_dir)
    real_evaluate = loop.evaluate

    def broken(*args, **kw):
        raise KeyError("style")  # what a template with a second placeholder raised inside open_clip

    monkeypatch.setattr(loop, "evaluate", broken)
    expected = (
        f"final evaluation failed: KeyError: 'style'; the training is complete and saved ({run.model_file}; "
        f"{run.checkpoint_path(3)} (step 3)); rerun the same command to evaluate again without training"
    )
    with pytest.raises(loop.FinalEvaluationFailed, match=f"^{re.escape(expected)}$"):
        train(cfg, progress=False)
    assert run.finished and run.checkpoints() == [run.checkpoint_path(3)]
    weights = torch.load(run.model_file, weights_only=True)
    assert [x["step"] for x in metrics(cfg.run_dir)] == [1, 2, 3]

    evaluated = []
    monkeypatch.setattr(loop, "evaluate", lambda *a, **kw: evaluated.append(1) or real_evaluate(*a, **kw))
    monkeypatch.setattr(loop, "learn", lambda *args, **kw: pytest.fail("a finished run trained again"))
    last = train(cfg, progress=False)  # the rerun: no step, the final evaluation only
    assert last["step"] == 3 and "loss" in last and evaluated == [1]
    lines = metrics(cfg.run_dir)
    assert [x["step"] for x in lines] == [1, 2, 3, 3] and "eval/average" in lines[-1]
    assert all(torch.equal(weights[k], v) for k, v in torch.load(run.model_file, weights_only=True).items())
    assert train(cfg, progress=False) == last and evaluated == [1]  # finished and evaluated: nothing to do
    assert len(metrics(cfg.run_dir)) == 4


def test_sigterm_at_the_last_step_saves_the_weights_and_a_rerun_only_evaluates(
    tmp_path, shards, monkeypatch, sigterm_guard
):
    def sigterm_at_the_last_step(state, *args, **kw):
        if state.counters.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return learn(state, *args, **kw)

    learn = loop.learn
    monkeypatch.setattr(loop, "learn", sigterm_at_the_last_step)
    cfg = config(tmp_path / "run", shards, "iid", steps=3, eval_data=bench_with(tmp_path / "bench"))
    run = RunDir(cfg.run_dir)
    with pytest.raises(
        Preempted, match=re.escape(f"preempted at step 3; checkpoint {run.checkpoint_path(3)};")
    ):
        train(cfg, progress=False)
    assert run.finished and "eval/average" not in metrics(cfg.run_dir)[-1]
    monkeypatch.setattr(loop, "learn", lambda *args, **kw: pytest.fail("a finished run trained again"))
    assert train(cfg, progress=False)["step"] == 3
    assert "eval/average" in metrics(cfg.run_dir)[-1]


def test_progress_in_a_log_file_is_plain_lines(tmp_path, shards, capsys):
    cfg = config(tmp_path / "run", shards, "iid", steps=4)
    train(cfg)  # progress on, stderr captured: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err  # before: one line rewritten at every step
    lines = [line for line in err.splitlines() if line.startswith(f"{RunDir(cfg.run_dir).name}:")]
    assert len(lines) == 2 and " 4/4 " in lines[-1] and "loss=" in lines[-1]  # the start and the end
