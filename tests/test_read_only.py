"""Read-only places: every command checks, before its work, that it can write where it will write, and says
how to write elsewhere; results are printed before they are written.

A read-only mount needs privileges a test does not have, so ``read_only(root)`` makes every write under
``root`` fail as one does: ``OSError(EROFS)`` from ``open`` for writing, ``os.open`` with a write flag,
``mkdir``, ``unlink``, ``rename``. (The issue's cases were reproduced on real read-only bind mounts too.)
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch

from jestclip.cli import main
from jestclip.commands.common import exit_status

from .data.test_loader import make_shards
from .eval.test_evaluate import make_suite

NOTICE = "WARNING:root:No pretrained weights loaded"  # open_clip's, on every model it creates


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(*roots)``: from now on, writing anything under the roots fails with EROFS."""
    roots: list[str] = []

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        where = os.path.abspath(os.fsdecode(path))
        return any(where == r or where.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real):
        def call(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real(path, *args, **kwargs)

        return call

    def guard_two(real):
        def call(src, dst, *args, **kwargs):
            for path in (src, dst):
                if inside(path):
                    refuse(path)
            return real(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in ("mkdir", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard_two(getattr(os, name)))

    def add(*paths):
        roots.extend(os.path.abspath(p) for p in paths)

    return add


def cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines but open_clip's notice) of ``jestclip ARGV`` in this process."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if not line.startswith(NOTICE)]


def must_not_run(*_, **__):
    raise AssertionError("the command did its work before checking where it writes")


def test_the_fixture_fails_writes_as_a_read_only_mount_does(tmp_path, read_only):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "old.txt").write_text("x")
    read_only(tmp_path / "ro")
    assert (tmp_path / "ro" / "old.txt").read_text() == "x"
    for write in (
        lambda: (tmp_path / "ro" / "new.txt").write_text("x"),
        lambda: (tmp_path / "ro" / "dir").mkdir(),
        lambda: (tmp_path / "ro" / "old.txt").unlink(),
        lambda: os.replace(tmp_path / "ro" / "old.txt", tmp_path / "ro" / "new.txt"),
        lambda: open(tmp_path / "ro" / "old.txt", "ab"),
    ):
        with pytest.raises(OSError) as caught:
            write()
        assert caught.value.errno == errno.EROFS
    (tmp_path / "rw.txt").write_text("elsewhere is fine")


def test_an_os_error_of_a_read_only_place_or_a_full_disk_is_one_line():
    # EROFS was not treated like EACCES: a 21-30-line traceback and exit 1
    assert exit_status(OSError(errno.EROFS, "Read-only file system", "/data/x.json")) == (
        2,
        "read-only file system writing /data/x.json",
    )
    assert exit_status(OSError(errno.ENOSPC, "No space left on device", "/data/x.npy")) == (
        1,
        "no space left on device writing /data/x.npy",
    )
    assert exit_status(OSError(errno.EIO, "Input/output error")) is None  # not the user's: a traceback


def test_train_checks_its_run_directory_before_anything(tmp_path, read_only, capsys, monkeypatch):
    from jestclip.train import startup

    make_shards(tmp_path / "shards", 2, 4)
    monkeypatch.setattr(startup, "build_state", must_not_run)
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    argv = ["train", "configs/iid.py", "--quick", f"run_dir={tmp_path / 'ro' / 'run'}"]
    argv += [f"data={tmp_path / 'shards'}", "model=jest-micro", "device=cpu", "eval_data=null"]
    assert cli(argv, capsys)[::2] == (
        2,
        [
            f"jestclip train: run directory {tmp_path}/ro/run cannot be written (read-only file system); set "
            "run_dir=DIR to write the run elsewhere"
        ],
    )


@pytest.fixture
def run_with_suite(tmp_path):
    from jestclip.models import create_model

    make_suite(tmp_path / "bench" / "eval", "toy", per_class=3)
    run = tmp_path / "ro" / "run"
    run.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(create_model("jest-micro").state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps({"model": "jest-micro"}))
    return run


def test_eval_checks_its_output_before_encoding_and_says_how_to_write_elsewhere(
    tmp_path, run_with_suite, read_only, capsys, monkeypatch
):
    """The issue's case: `eval` encoded the whole suite, then died writing eval.json before printing its
    table: the results were lost."""
    import jestclip.eval

    real = jestclip.eval.evaluate
    monkeypatch.setattr(jestclip.eval, "evaluate", must_not_run)
    read_only(tmp_path / "ro")
    argv = ["eval", run_with_suite, "--data", tmp_path / "bench", "--device", "cpu"]
    assert cli(argv, capsys)[::2] == (
        2,
        [
            f"jestclip eval: the results' directory {run_with_suite} cannot be written (read-only file "
            "system); pass --out FILE to write eval.json elsewhere"
        ],
    )
    monkeypatch.setattr(jestclip.eval, "evaluate", real)
    status, out, _ = cli([*argv, "--out", tmp_path / "mine" / "eval.json"], capsys)
    assert status == 0 and "average" in out
    assert json.loads((tmp_path / "mine" / "eval.json").read_text())["suites"]["toy"]["samples"] == 12


def test_eval_prints_its_results_before_writing_them(tmp_path, run_with_suite, capsys, monkeypatch):
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "eval.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    status, out, err = cli(["eval", run_with_suite, "--data", tmp_path / "bench", "--device", "cpu"], capsys)
    assert status == 1 and "toy    zeroshot:colour" in out and "all    average" in out  # shown first
    assert err[-1] == f"jestclip eval: no space left on device writing {run_with_suite}/eval.json"
    assert [line for line in err if "Traceback" in line] == []


def test_cache_reference_checks_the_sidecar_directory_before_embedding(
    tmp_path, read_only, capsys, monkeypatch
):
    """The issue's case: a read-only dataset mount; it embedded a shard before its first write failed."""
    from jestclip.data import caching, refcache
    from jestclip.models import create_model

    urls = make_shards(tmp_path / "ro", 2, 3)
    torch.manual_seed(0)
    torch.save(create_model("jest-micro").state_dict(), tmp_path / "ref.pt")
    argv = ["cache-reference", tmp_path / "ro", "--model", "jest-micro", "--checkpoint", tmp_path / "ref.pt"]
    argv += ["--device", "cpu"]
    real = caching._CacheJob.run
    monkeypatch.setattr(caching._CacheJob, "run", must_not_run)
    read_only(tmp_path / "ro")
    assert cli(argv, capsys)[::2] == (
        2,
        [
            f"jestclip cache-reference: the 'reference' sidecars' directory {tmp_path}/ro cannot be written "
            "(read-only file system); pass --cache-dir DIR to write the sidecars into a directory of your "
            "own (library: cache_dir=DIR; then train with reference_cache_dir=DIR)"
        ],
    )
    monkeypatch.setattr(caching._CacheJob, "run", real)
    status, out, _ = cli([*argv, "--cache-dir", tmp_path / "cache"], capsys)
    assert status == 0 and json.loads(out)["written"] == 2
    assert refcache.ReferenceCache(urls, cache_dir=tmp_path / "cache").lookup(["s1_002"]).image.shape == (
        1,
        64,
    )
    status, out, _ = cli([*argv, "--cache-dir", tmp_path / "cache"], capsys)  # resumed: nothing to write
    assert status == 0 and json.loads(out)["kept"] == 2


def test_a_read_only_shard_directory_with_complete_sidecars_needs_no_writing(tmp_path, read_only, capsys):
    from jestclip.models import create_model

    make_shards(tmp_path / "ro", 1, 3)
    torch.manual_seed(0)
    torch.save(create_model("jest-micro").state_dict(), tmp_path / "ref.pt")
    argv = ["cache-reference", tmp_path / "ro", "--model", "jest-micro", "--checkpoint", tmp_path / "ref.pt"]
    argv += ["--device", "cpu"]
    assert cli(argv, capsys)[0] == 0
    read_only(tmp_path / "ro")  # mounted read-only once cached
    status, out, _ = cli(argv, capsys)
    assert status == 0 and json.loads(out)["kept"] == 1


def test_the_other_commands_check_where_they_write_first(tmp_path, read_only, capsys, monkeypatch):
    from jestclip.data import keeplist

    from .data.test_keeplist import cached

    urls, _ = cached(tmp_path / "pool")
    monkeypatch.setattr(keeplist, "_score_pool", must_not_run)
    ro = tmp_path / "ro"
    ro.mkdir()  # the mount point
    read_only(ro)
    cases = [
        (["filter", *urls, "--keep", "0.5", "--out", ro / "keep"], f"keep list directory {ro}/keep", "--out"),
        (["report", tmp_path / "run", "--out", ro / "report"], f"report directory {ro}/report", "--out"),
        (["data", "build", ro / "bench", "--sources", "icons"], f"output directory {ro}/bench", "OUT"),
        (["data", "corrupt", tmp_path / "pool", ro / "swap", "--swap-captions", "0.5"], f"{ro}/swap", "OUT"),
        (["demo", "--out", ro / "runs", "--data", tmp_path / "d"], f"--out {ro}/runs", "--out DIR"),
        (["demo", "--out", tmp_path / "runs", "--data", ro / "bench"], f"--data {ro}/bench", "--data DIR"),
    ]
    for argv, where, hint in cases:
        status, _, err = cli(argv, capsys)
        assert status == 2 and len(err) == 1, (argv, err)
        assert f"{where} cannot be written (read-only file system)" in err[0] and hint in err[0], err
