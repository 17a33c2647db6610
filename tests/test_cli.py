"""The `vr-mcmc` command: the console script is installed, prints help, and `check` checks the engine.
The demo and `summary` are tested in test_demo.py."""

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
    for command in ("demo", "summary", "check", "memory"):
        assert command in result.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: vr-mcmc" in capsys.readouterr().out


def test_check_compares_the_engine_with_the_loop(capsys):
    assert main(["check", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK: largest relative error" in out
    for model in ("MLP", "CNN", "Transformer"):
        assert model in out


def test_check_rejects_a_bad_batch_size():
    with pytest.raises(SystemExit):
        main(["check", "--batch-size", "0"])


def test_module_runs_as_script():
    result = subprocess.run([sys.executable, "-m", "vr_mcmc.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "vr-mcmc" in result.stdout


@pytest.mark.parametrize("arch", ["lenet5", "vgg16", "resnet34", "mlp"])
def test_memory_prints_the_planner_table(arch, capsys):
    assert main(["memory", "--arch", arch, "--num-data", "50000", "--rank", "2", "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "rank-2+partition-64" in out and "total" in out and "GB" in out


def test_memory_mlp_figures_match_the_formulas(capsys):
    """784-512-512-10, N = 60,000, float32: naive N·P·4 bytes; factored N·Σ(d_in + d_out)·4 + biases."""
    main(["memory", "--arch", "mlp", "--num-data", "60000"])
    total = capsys.readouterr().out.splitlines()[-1].split()
    p = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    factored = (784 + 512) + 512 + (512 + 512) + 512 + (512 + 10) + 10
    assert float(total[1]) == pytest.approx(60_000 * p * 4 / 1e9, abs=1e-4)
    assert float(total[2]) == pytest.approx(60_000 * factored * 4 / 1e9, abs=1e-4)


def test_memory_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["memory", "--arch", "vgg16", "--num-data", "0"])
    with pytest.raises(SystemExit):
        main(["memory", "--arch", "vgg16", "--num-data", "10", "--input", "3xAx32"])
