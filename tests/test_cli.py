"""The `vr-mcmc` command: the console script is installed, prints help, and the demo checks itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from vr_mcmc.cli import main


def test_console_script_is_installed_and_prints_help():
    # The scripts folder of the interpreter running the tests: the environment the package went into.
    exe = shutil.which("vr-mcmc", path=sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None, "the vr-mcmc console script is not on PATH: was the package installed?"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: vr-mcmc" in capsys.readouterr().out


def test_demo_checks_the_engine_against_the_loop(capsys):
    assert main(["demo", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK: largest relative error" in out
    for model in ("MLP", "CNN", "Transformer"):
        assert model in out


def test_demo_rejects_a_bad_batch_size():
    with pytest.raises(SystemExit):
        main(["demo", "--batch-size", "0"])


def test_module_runs_as_script():
    result = subprocess.run([sys.executable, "-m", "vr_mcmc.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "vr-mcmc" in result.stdout
