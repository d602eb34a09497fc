import subprocess
import sys

import pytest

from jestclip.cli import main

SUBCOMMANDS = ["data", "train", "cache-reference", "eval", "report", "demo"]
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
    with pytest.raises(SystemExit, match="--checkpoint"):
        main(["cache-reference", *urls, "--model", "jest-micro"])


def test_train_command_prints_resolved_config(capsys):
    assert main(["train", "configs/jest.py", "--quick", "steps=3", "method.gain=5.0", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert '"steps": 3' in printed and '"gain": 5.0' in printed
    with pytest.raises(ValueError, match="unknown config key"):
        main(["train", "configs/jest.py", "nope=1"])
