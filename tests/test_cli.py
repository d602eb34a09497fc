import subprocess
import sys

import pytest

from jestclip.cli import main

SUBCOMMANDS = ["data", "train", "cache-reference", "eval", "report", "demo"]


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "jestclip.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_unbuilt_subcommands_say_so_and_fail(name, capsys):
    assert main([name]) == 2
    assert "not implemented yet" in capsys.readouterr().err
