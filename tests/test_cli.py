import subprocess
import sys
from pathlib import Path

import pytest

from jestclip.cli import _COMMANDS, main

SUBCOMMANDS = list(_COMMANDS)  # what exists, from the code
HEAVY = ("torch", "open_clip", "numpy", "PIL", "webdataset", "resvg_py")


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "jestclip.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out


def test_help_imports_no_heavy_modules():
    # building the parser and printing every help page loads neither torch nor open_clip nor numpy
    code = f"""
import sys
from jestclip.cli import build_parser, main
build_parser()
for argv in [["--help"]] + [[name, "--help"] for name in {SUBCOMMANDS!r}]:
    try:
        main(argv)
    except SystemExit as exit_info:
        assert exit_info.code == 0, (argv, exit_info.code)
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not heavy, f"imported {{heavy}}"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cache-reference" in result.stdout


def test_data_needs_an_action(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data"])
    assert exit_info.value.code == 2
    assert "ACTION" in capsys.readouterr().err


def test_data_sources_reports_what_is_missing(tmp_path, capsys):
    # an empty npm root: the emoji source (Twemoji, OpenMoji) is missing, and the command says how to fix it
    code = main(["data", "sources", "--npm-root", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "emoji" in captured.out and "missing" in captured.out
    assert "jestclip data sources --install" in captured.err


def test_cache_reference_command(tmp_path, capsys):
    import torch

    from jestclip.data.refcache import ReferenceCache
    from jestclip.models import create_model, model_fingerprint

    from .data.test_loader import make_shards

    urls = make_shards(tmp_path, 1, 3)
    model = create_model("jest-micro")
    torch.save(model.state_dict(), tmp_path / "ref.pt")
    assert (
        main(["cache-reference", *urls, "--model", "jest-micro", "--checkpoint", str(tmp_path / "ref.pt")])
        == 0
    )
    assert '"samples": 3' in capsys.readouterr().out
    assert ReferenceCache(urls, fingerprint=model_fingerprint(model)).lookup(["s0_001"]).image.shape == (
        1,
        64,
    )
    assert main(["cache-reference", *urls, "--model", "jest-micro"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # a reference trained with the softmax (CLIP) loss: its loss is read from the weights (no logit bias)
    clip = create_model("jest-micro", loss="softmax")
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    argv = ["cache-reference", *urls, "--model", "jest-micro", "--checkpoint", str(tmp_path / "clip.pt")]
    assert main([*argv, "--name", "clip"]) == 0
    assert ReferenceCache(urls, name="clip", fingerprint=model_fingerprint(clip)).meta.bias == 0.0


def test_train_command_prints_resolved_config(capsys):
    assert main(["train", "configs/jest.py", "--quick", "steps=3", "method.gain=5.0", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert '"steps": 3' in printed and '"gain": 5.0' in printed


def test_train_lists_every_method_from_the_code(capsys):
    from jestclip.train.methods import METHODS

    assert main(["train", "--methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)
    assert all(METHODS[line.split()[0]].summary in line for line in lines)


def test_train_schedules_a_run_for_another_runs_flops(tmp_path, capsys):
    import json

    from jestclip.train.config import apply_overrides, load_recipe
    from jestclip.train.startup import StepCosts

    iid = apply_overrides(
        load_recipe("configs/iid.py", quick=True), ["model=jest-micro", "method.batch_size=8"]
    )
    per_step = StepCosts.measure(iid).total(8)
    run = tmp_path / "iid"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 40, "flops_total": 40 * per_step}) + "\n")
    argv = [
        "train",
        "configs/jest.py",
        "--quick",
        "model=jest-micro",
        "method.batch_size=8",
        "--print-config",
    ]
    assert main([*argv, "--flops-of", str(run)]) == 0
    out = capsys.readouterr().out
    # JEST at f = 0.8 scores B = 40 and learns b = 8: (40 + 3 x 8) / (3 x 8) = 8/3 of an IID step
    assert out.startswith("train: 15 steps fit a budget of") and '"steps": 15' in out
    assert main([*argv, "--flops", "1"]) == 2
    assert "does not cover one step" in capsys.readouterr().err


# open_clip logs this on every model it creates (no pretrained tag); it is not the command's error line
OPEN_CLIP_NOTICE = "WARNING:root:No pretrained weights loaded"


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of ``jestclip ARGV`` run in this process."""
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's usage errors
        status = exit_info.code
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if not line.startswith(OPEN_CLIP_NOTICE)]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A directory with a damaged weights file, shards, a plain file and broken recipes."""
    from .data.test_loader import make_shards

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "model.pt").write_bytes(b"PK\x03\x04 truncated zip, not a torch file" * 4)
    (root / "shards").mkdir()
    make_shards(root / "shards", 1, 2)
    (root / "file.txt").write_text("not a directory\n")
    (root / "raises.py").write_text("def get_config(quick=False):\n    raise RuntimeError('boom')\n")
    (root / "noget.py").write_text("x = 1\n")
    (root / "oldkeep").mkdir()
    (root / "oldkeep" / "keep.json").write_text('{"format": "jestclip-keeplist/1"}')  # before digests
    return root


# the train cases point run_dir and data into the temporary directory, and the demo cases name a file as
# --data: should a check regress, the command fails fast there instead of training or building in the repo
SAFE = ["run_dir={tmp}/run", "data={tmp}/missing"]

USER_ERRORS = [
    (["data", "inspect", "{tmp}/missing"], "{tmp}/missing"),
    (["data", "build", "{tmp}/out", "--sources", "bogus"], "bogus"),
    (["data", "frob"], "invalid choice: 'frob'"),
    (["cache-reference", "{tmp}/shards", "--model", "jest-micro"], "--checkpoint"),
    (
        ["cache-reference", "{tmp}/shards", "--model", "jest-micro", "--checkpoint", "{tmp}/model.pt"],
        "cannot load weights from {tmp}/model.pt",
    ),
    (["cache-reference", "{tmp}/shards", "--model", "jest-micro", "--device", "foo"], "'foo'"),
    (
        ["filter", "{tmp}/shards", "--keep", "0.5", "--out", "{tmp}/keep"],
        "no cached 'reference' embeddings for shard {tmp}/shards/00000.tar",
    ),
    (["filter", "{tmp}/shards", "--keep", "1.5", "--out", "{tmp}/keep"], "1.5 is not a fraction in (0, 1]"),
    (["filter", "{tmp}/shards", "--keep", "0.5", "--out", "{tmp}/file.txt"], "{tmp}/file.txt is a file"),
    (["filter", "{tmp}/shards", "--keep", "0.5"], "the following arguments are required: --out"),
    (
        ["filter", "pipe:cat {tmp}/shards/00000.tar", "--keep", "0.5", "--out", "{tmp}/keep"],
        "shard pipe:cat {tmp}/shards/00000.tar is not a local file, so its 'reference' sidecars cannot sit",
    ),
    (
        [
            "filter",
            "pipe:cat {tmp}/shards/00000.tar",
            "--keep",
            "0.5",
            "--out",
            "{tmp}/keep",
            "--cache-dir",
            "{tmp}",
        ],
        "no cached 'reference' embeddings for shard pipe:cat {tmp}/shards/00000.tar",
    ),
    (
        ["train", "configs/filter.py", *SAFE, "keep_list=null"],
        "config: keep_list = None must be set for method 'filter'",
    ),
    (
        ["train", "configs/drrho.py", *SAFE, "reference_cache=null"],
        "config: reference_cache = None must be set for method 'drrho': its loss uses the reference's",
    ),
    (
        ["train", "configs/iid.py", *SAFE, "method.method=jest"],
        "config: reference_cache = None must be set for method 'jest': its scoring 'learnability' uses",
    ),
    (
        [
            "train",
            "configs/iid.py",
            "run_dir={tmp}/run",
            "data={tmp}/shards",
            "model=jest-micro",
            "eval_data={tmp}/shards",
            "keep_list={tmp}",
        ],
        "keep list {tmp} holds no keep.json",
    ),
    (
        [
            "train",
            "configs/iid.py",
            "run_dir={tmp}/run",
            "data={tmp}/shards",
            "model=jest-micro",
            "eval_data={tmp}/shards",
            "keep_list={tmp}/oldkeep",
        ],
        "keep list {tmp}/oldkeep/keep.json is of format jestclip-keeplist/1, without the content digests",
    ),
    (["train", "{tmp}/missing.py"], "recipe {tmp}/missing.py does not exist"),
    (
        ["train", "configs/jest.py", "--quick", "run_dir={tmp}/run", "data={tmp}/bench/pool"],
        "data={tmp}/bench/pool does not exist (relative to",  # ... build it with `jestclip data build`
    ),
    (["train", "{tmp}/raises.py"], "recipe {tmp}/raises.py: RuntimeError: boom"),
    (["train", "{tmp}/noget.py"], "defines no get_config"),
    (["train", "configs/jest.py", *SAFE, "steps=abc"], "config: steps = 'abc' is not an int"),
    (["train", "configs/jest.py", *SAFE, "steps=3.5"], "config: steps = 3.5 is not an int"),
    (["train", "configs/jest.py", *SAFE, "log_every=0"], "config: log_every = 0 must be >= 1"),
    (
        ["train", "configs/jest.py", *SAFE, "method.scoring=bar"],
        "config: method.scoring = 'bar' is not one of",
    ),
    (["train", "configs/jest.py", *SAFE, "nope=1"], "unknown config key 'nope'"),
    (["train", "configs/jest.py", *SAFE, "--bogus"], "unknown option(s) ['--bogus']"),
    (["eval", "{tmp}/missing"], "{tmp}/missing does not exist"),
    (["eval", "{tmp}/model.pt"], "say which model it holds with --model"),
    (["eval", "{tmp}"], "is not a training run"),
    (
        ["eval", "{tmp}/model.pt", "--model", "jest-micro", "--shards", "{tmp}/shards", "--device", "cpu"],
        "cannot load weights from {tmp}/model.pt",
    ),
    (
        [
            "eval",
            "{tmp}/model.pt",
            "--model",
            "jest-micro",
            "--shards",
            "{tmp}/shards",
            "--classes",
            "{tmp}/missing.txt",
        ],
        "--classes file {tmp}/missing.txt does not exist",
    ),
    (["eval", "{tmp}/model.pt", "--model", "jest-micro", "--data", "{tmp}/missing"], "{tmp}/missing"),
    (["report", "{tmp}/missing", "--out", "{tmp}/report"], "{tmp}/missing is not a training run"),
    (["report", "{tmp}", "--out", "{tmp}/report", "--device", "foo"], "'foo'"),
    (["demo", "--out", "{tmp}/file.txt", "--data", "{tmp}/file.txt"], "--data {tmp}/file.txt is a file"),
    (["demo", "--device", "cuda:x", "--data", "{tmp}/file.txt", "--out", "{tmp}/file.txt"], "'cuda:x'"),
]


@pytest.mark.parametrize(
    ("argv", "expected"), USER_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_user_errors_are_one_line_and_exit_2(argv, expected, bad_inputs, capsys):
    argv = [arg.format(tmp=bad_inputs) for arg in argv]
    status, lines = run_cli(argv, capsys)
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"jestclip {argv[0]}") and expected.format(tmp=bad_inputs) in lines[0]
    assert "Traceback" not in lines[0]


def test_debug_shows_the_traceback(capsys):
    argv = [
        "--debug",
        "train",
        "configs/jest.py",
        "run_dir=/nonexistent/run",
        "data=/nonexistent",
        "log_every=0",
    ]
    status, lines = run_cli(argv, capsys)
    assert status == 2
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "jestclip train: config: log_every = 0 must be >= 1"


class Preempted(Exception):
    pass


class TrainingDiverged(Exception):
    pass


class CheckpointWriteError(OSError):
    pass


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Preempted("preempted by SIGTERM at step 7; checkpoint saved, resume with the same command"), 143),
        (TrainingDiverged("loss is nan at step 12 after 3 bad steps"), 1),
        (CheckpointWriteError("cannot write checkpoint: No space left on device"), 1),
    ],
)
def test_a_runs_own_endings_have_their_exit_status(error, status, monkeypatch, capsys):
    # the run's exceptions are looked up by name in jestclip.train.loop once it is loaded
    import types

    from jestclip.commands import train as train_command

    loop = types.SimpleNamespace(
        Preempted=Preempted, TrainingDiverged=TrainingDiverged, CheckpointWriteError=CheckpointWriteError
    )
    monkeypatch.setitem(sys.modules, "jestclip.train.loop", loop)

    def ending(args):
        raise error

    monkeypatch.setattr(train_command, "run", ending)
    assert run_cli(["train", "configs/jest.py"], capsys) == (status, [f"jestclip train: {error}"])


def test_every_ending_has_its_documented_exit_status(monkeypatch, capsys):
    """0, 1, 2, 75, 130, 143: each a line saying what to do (docs/reliability.md's table)."""
    from jestclip.commands import train as train_command
    from jestclip.commands.common import EXIT_STATUSES, RUN_EXITS, exit_status
    from jestclip.data.loader import dead_loader_worker
    from jestclip.train import loop

    assert set(EXIT_STATUSES) == {0, 1, 2, 75, 130, 143} >= set(RUN_EXITS.values())
    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    assert all(f"| {status} |" in doc for status in EXIT_STATUSES)
    # torch's words for a dead worker, from the iterator and from its SIGCHLD handler
    killed = RuntimeError("DataLoader worker (pid 8398) is killed by signal: Killed. ")
    assert dead_loader_worker(killed) == (
        "a data loader worker (pid 8398) was killed by signal: Killed (SIGKILL: often the out-of-memory "
        "killer)"
    )
    gone = RuntimeError("DataLoader worker (pid(s) 11, 12) exited unexpectedly")
    assert dead_loader_worker(gone) == "data loader workers (pids 11, 12) exited unexpectedly"
    assert dead_loader_worker(RuntimeError("CUDA error")) is None and dead_loader_worker(ValueError()) is None
    assert exit_status(killed)[0] == 75  # outside a training run too (eval, cache-reference)
    assert exit_status(KeyboardInterrupt()) == (130, "interrupted by SIGINT; rerun the same command")
    for error, status in [
        (
            loop.Interrupted(
                "interrupted after step 7: ...; last checkpoint R/checkpoint-000004.pt (step 4)"
            ),
            75,
        ),
        (KeyboardInterrupt("interrupted after step 3: SIGINT; last checkpoint none"), 130),
        (loop.Preempted("preempted at step 3; checkpoint R/checkpoint-000003.pt"), 143),
    ]:

        def ending(args, error=error):
            raise error

        monkeypatch.setattr(train_command, "run", ending)
        assert run_cli(["train", "configs/jest.py"], capsys) == (status, [f"jestclip train: {error}"])


def test_bugs_keep_their_traceback(monkeypatch):
    from jestclip.commands import train as train_command

    def bug(args):
        raise KeyError("not a user error")

    monkeypatch.setattr(train_command, "run", bug)
    with pytest.raises(KeyError):
        main(["train", "configs/jest.py"])
    monkeypatch.setattr(train_command, "run", lambda args: sys.exit(3))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/jest.py"])
    assert exit_info.value.code == 3


def test_exit_status_of_the_installed_command(tmp_path):
    # `python -m jestclip.cli` exits with main()'s status; the demo's argument check needs no torch
    file = tmp_path / "file.txt"
    file.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "jestclip.cli", "demo", "--data", str(file), "--out", str(file)],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stderr.splitlines()) == (
        2,
        [f"jestclip demo: --data {file} is a file, not a directory"],
    )


def test_a_damaged_weights_file_is_named(tmp_path):
    import torch

    from jestclip.commands.common import loading_weights

    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=rf"^cannot load weights from {path}: \w+"), loading_weights(path):
        torch.load(path, weights_only=True)
    with pytest.raises(KeyError), loading_weights(path):  # other errors pass through
        raise KeyError("x")


def test_the_runs_own_exceptions_are_found_where_they_live():
    # the names RUN_EXITS looks up exist in jestclip.train.loop (CheckpointWriteError comes from rundir)
    from jestclip.commands.common import RUN_EXITS, exit_status
    from jestclip.train import loop

    for name, status in RUN_EXITS.items():
        assert exit_status(getattr(loop, name)(f"{name} message")) == (status, f"{name} message")


def _pretrained_standins(monkeypatch) -> dict:
    """Stand-ins so that `cache-reference --pretrained TAG` downloads nothing: create_model gives jest-micro
    behind full-size inputs, tokenizer gives jest-micro's; they and cache_reference (the real one, run after)
    record what they receive. Returns the record."""
    import torch
    import torch.nn.functional as F

    import jestclip.models as models
    import jestclip.train.reference as reference

    seen: dict = {"images": []}
    micro, micro_tokenizer = models.create_model("jest-micro"), models.tokenizer("jest-micro")
    real_cache_reference = reference.cache_reference

    class Standin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.logit_scale, self.logit_bias = micro, micro.logit_scale, micro.logit_bias

        def encode_image(self, images: torch.Tensor) -> torch.Tensor:
            seen["images"].append(images)
            return self.inner.encode_image(F.interpolate(images, size=32))

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.inner.encode_text(tokens)

    def create_model(name, **kwargs):
        seen["create_model"] = (name, kwargs["pretrained"])
        return Standin()

    def tokenizer(name, pretrained=None):
        seen["tokenizer"] = (name, pretrained)
        return micro_tokenizer

    def cache_reference(*args, **kwargs):
        seen["cache_reference"] = kwargs
        return real_cache_reference(*args, **kwargs)

    monkeypatch.setattr(reference, "create_model", create_model)
    monkeypatch.setattr(reference, "tokenizer", tokenizer)
    monkeypatch.setattr(reference, "cache_reference", cache_reference)
    return seen


def test_cache_reference_pretrained_preprocesses_as_the_tag_was_trained(tmp_path, monkeypatch, capsys):
    """--pretrained: SigLIP's webli weights see squashed 256-pixel images normalised with mean = std = 0.5
    and the model's own tokenizer; the sidecars record the model as NAME@TAG."""
    import json

    import torch
    from torchvision.transforms import CenterCrop, Normalize, Resize

    from jestclip.data.refcache import sidecar_path

    from .data.test_loader import make_shards

    seen = _pretrained_standins(monkeypatch)
    urls = make_shards(tmp_path, 1, 3)
    argv = ["cache-reference", *urls, "--model", "ViT-B-16-SigLIP-256", "--pretrained", "webli"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert '"samples": 3' in capsys.readouterr().out
    assert seen["create_model"] == seen["tokenizer"] == ("ViT-B-16-SigLIP-256", "webli")
    steps = seen["cache_reference"]["transform"].transforms
    assert isinstance(steps[0], Resize) and tuple(steps[0].size) == (256, 256)
    assert not any(isinstance(step, CenterCrop) for step in steps)
    assert isinstance(steps[-1], Normalize) and tuple(steps[-1].mean) == tuple(steps[-1].std) == (0.5,) * 3
    images = torch.cat(seen["images"])
    assert images.shape == (3, 3, 256, 256) and images.min() >= -1 and images.max() <= 1
    assert json.loads(sidecar_path(urls[0], "reference").read_text())["model"] == "ViT-B-16-SigLIP-256@webli"


def test_cache_reference_without_a_tag_keeps_the_learners_preprocessing(tmp_path, monkeypatch, capsys):
    import json

    from jestclip.data.refcache import sidecar_path
    from jestclip.models import image_transform

    from .data.test_loader import make_shards

    seen = _pretrained_standins(monkeypatch)
    urls = make_shards(tmp_path, 1, 2)
    # the stand-in create_model ignores the checkpoint (it does not exist: --loss, or its loss would be read)
    argv = ["cache-reference", *urls, "--model", "jest-micro", "--checkpoint", str(tmp_path / "x.pt")]
    assert main([*argv, "--device", "cpu", "--loss", "sigmoid"]) == 0
    assert seen["tokenizer"] == ("jest-micro", None)
    assert repr(seen["cache_reference"]["transform"]) == repr(image_transform("jest-micro"))
    assert json.loads(sidecar_path(urls[0], "reference").read_text())["model"] == "jest-micro"


def test_cache_reference_with_an_unknown_tag_downloads_nothing(tmp_path, monkeypatch, capsys):
    import open_clip

    def no_download(*args, **kwargs):
        raise AssertionError("open_clip.create_model called for an unknown tag")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    status, lines = run_cli(
        ["cache-reference", str(tmp_path), "--model", "ViT-B-32", "--pretrained", "nope"], capsys
    )
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("jestclip cache-reference: unknown pretrained tag 'nope' for model 'ViT-B-32'")


# --- SIGTERM at any moment ------------------------------------------------------------------------------


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler installed (Linux: SigCgt of /proc/PID/status)."""
    import re
    import signal
    from pathlib import Path

    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"SigCgt:\s*([0-9a-f]+)", status)[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_sigterm_at_any_moment_exits_143_with_its_line(tmp_path):
    """SIGTERM from the command's first line on: while importing torch, building the run, training."""
    import os
    import signal
    import time

    from .data.test_loader import make_shards

    make_shards(tmp_path / "shards", 2, 8)
    overrides = [
        f"data={tmp_path / 'shards'}",
        "model=jest-micro",
        "steps=100000",
        "method.batch_size=4",
        "num_workers=0",
        "device=cpu",
        "eval_data=null",
        "checkpoint_every=100000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endings = []
    for delay in (0.0, 0.2, 1.0, 4.0):  # after the handler is in place: imports, imports, setup, steps
        argv = ["train", "configs/iid.py", "--quick", f"run_dir={tmp_path / f'run{delay}'}", *overrides]
        proc = subprocess.Popen(
            [sys.executable, "-m", "jestclip.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        deadline = time.monotonic() + 60
        while not catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.decode().splitlines() if line.strip()]
        assert proc.returncode == 143, (delay, proc.returncode, lines[-5:])
        assert lines[-1].startswith("jestclip") and ": preempted " in lines[-1], (delay, lines[-5:])
        endings.append(lines[-1].split(": ", 1)[1])
    # at 0 s the signal comes inside imports: the command stops once the import is done, with the CLI's line
    # ("preempted by SIGTERM; ...") or, when train() has started by then, the run's ("... while starting")
    assert all(ending.startswith("preempted ") for ending in endings), endings


def test_a_sigterm_during_an_import_is_delivered_again_once_the_import_is_done(tmp_path, monkeypatch):
    """Raising into a module's initialisation (a C extension's, ``import torch``) can abort the interpreter
    (exit -6 was seen under load): the handler re-sends the signal instead, and raises outside imports."""
    import importlib
    import os
    import signal

    from jestclip import signals
    from jestclip.commands import common

    (tmp_path / "slow_module.py").write_text(
        "import sys\nfrom jestclip.signals import inside_import\nINSIDE = inside_import(sys._getframe())\n"
        "from jestclip.commands.common import terminate\nimport os, signal\n"
        "terminate(os.getpid())(signal.SIGTERM, sys._getframe())\n"
    )
    sent = []
    monkeypatch.setattr(common, "deliver_again", lambda signum, pid: sent.append((signum, pid)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("slow_module")  # the handler ran inside its import: nothing raised
    assert module.INSIDE and sent == [(signal.SIGTERM, os.getpid())]
    assert not signals.inside_import(sys._getframe())
    with pytest.raises(common.Terminated):  # outside an import it stops the command at once
        common.terminate(os.getpid())(signal.SIGTERM, sys._getframe())


def test_python_dash_m_jestclip_is_the_command(tmp_path):
    """``python -m jestclip`` runs the command where no entry point is installed (a source tree on PYTHONPATH,
    ``torchrun -m jestclip``): same parser, same one-line errors and status."""
    done = subprocess.run(
        [sys.executable, "-m", "jestclip", "data", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2
        and done.stderr.strip() == f"jestclip data: shard '{tmp_path}/missing' does not exist"
    )
