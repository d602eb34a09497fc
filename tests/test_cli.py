import subprocess
import sys

import pytest

from jestclip.cli import main

SUBCOMMANDS = ["data", "train", "cache-reference", "eval", "report", "demo"]
UNBUILT = ["train", "cache-reference", "eval", "report", "demo"]


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "jestclip.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", UNBUILT)
def test_unbuilt_subcommands_say_so_and_fail(name, capsys):
    assert main([name]) == 2
    assert "not implemented yet" in capsys.readouterr().err


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
