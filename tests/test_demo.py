"""`vr-mcmc demo --quick` end to end (files, ArviZ reads them) and `vr-mcmc summary` on its output and on bad files."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
az = pytest.importorskip("arviz")

from vr_mcmc.cli import main  # noqa: E402
from vr_mcmc.demo import DEMO_SETTINGS, QUICK  # noqa: E402
from vr_mcmc.predictive import load_reference  # noqa: E402
from vr_mcmc.sg_compare import METHODS, budget_scores, run_method  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FILES = tuple(f"{s.key}_{m.lower()}.nc" for s in DEMO_SETTINGS for m in METHODS)

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo gives back the thread setting it changed
    return out


def test_demo_writes_results_report_and_plots(demo_run):
    for name in (*FILES, "report.txt"):
        assert (demo_run / name).stat().st_size > 0, name
    report = (demo_run / "report.txt").read_text()
    for text in ("best case here", "VR cannot help", "noise_ratio", "passes to SGLD TV",
                 "torch thread", "elapsed:", "r_hat", "ess_bulk", *METHODS):
        assert text in report, text
    if HAS_MATPLOTLIB:
        assert (demo_run / "tv_vs_passes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table_row(report: str, title: str, method: str) -> list[str]:
    section = report[report.index(title):]
    return next(line for line in section.splitlines() if line.startswith(f"{method} ")).split()


def test_demo_table_is_the_benchmark_computation(demo_run):
    """The demo's TV and agreement are those of the same chains scored as benchmarks/bnn_vr.py scores them."""
    report = (demo_run / "report.txt").read_text()
    setting = DEMO_SETTINGS[0]
    reference = load_reference(setting.problem)
    for method in ("SGLD", "SAGA-LD"):
        runs = run_method(setting.problem, method, setting.steps[method], setting.batch_size, QUICK.passes,
                          num_chains=QUICK.num_chains, draws_per_pass=QUICK.draws_per_pass)
        scores = [budget_scores(r, reference, [QUICK.passes]) for r in runs]
        row = _table_row(report, setting.title, method)
        assert float(row[2]) == pytest.approx(np.mean([s["tv"][0] for s in scores]), abs=1e-4)
        assert float(row[3]) == pytest.approx(np.mean([s["agreement"][0] for s in scores]), abs=1e-4)


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")
@pytest.mark.parametrize("name", FILES[:4])
def test_demo_files_are_arviz_data(demo_run, name):
    idata = az.from_netcdf(str(demo_run / name))
    post = idata.posterior
    assert post.sizes["chain"] == QUICK.num_chains
    draws = post.sizes["draw"]
    assert post["probs"].shape == (QUICK.num_chains, draws, 450, 10)
    probs = post["probs"].values  # packed as uint16 on disk, unpacked on reading
    assert np.all((probs >= 0) & (probs <= 1)) and np.allclose(probs.sum(-1), 1, atol=1e-3)
    y = idata.observed_data["obs"].values
    loglik = idata.log_likelihood["obs"].values
    p_true = np.take_along_axis(probs, np.broadcast_to(y[None, None, :, None], (*probs.shape[:3], 1)), -1)[..., 0]
    np.testing.assert_allclose(np.exp(loglik), p_true, atol=2e-5)
    np.testing.assert_allclose(post["test_loglik"].values, loglik.astype(np.float64).mean(-1), rtol=1e-5)
    accuracy = (probs.argmax(-1) == y).mean(-1)
    np.testing.assert_allclose(post["accuracy"].values, accuracy)
    passes = idata.sample_stats["data_passes"].values
    assert np.all(np.diff(passes, axis=1) > 0)
    # the budget is reached, and a chain runs at most one epoch past it (3 passes for SVRG-LD: two gradients per
    # example and a snapshot), plus SVRG-LD's first snapshot
    per_epoch = {"svrg-ld": 3.0, "sgld-cv": 2.0}.get(name.split("_", 1)[1][:-3], 1.0)
    assert QUICK.passes <= passes[:, -1].min() <= QUICK.passes + per_epoch * 1.05 + 1.0
    az.summary(idata, var_names=["accuracy", "test_loglik"])
    assert math.isfinite(float(az.loo(idata)["elpd_loo"]))


def test_data_passes_count_the_gradients():
    """N = 1347, batch 32: 43 steps an epoch. SGLD/SAGA-LD compute one gradient per example a step, SVRG-LD
    three passes an epoch (two gradients per example and a snapshot), SGLD-CV its 5 passes of SGD and one μ̃
    pass before the first step. A chain reaches the budget (12 passes) and runs one epoch past it."""
    setting = DEMO_SETTINGS[1]
    data = setting.problem.data()
    ends = {}
    for method in METHODS:
        run = run_method(setting.problem, method, 6e-4, 32, 12.0, data=data, draws_per_pass=1.0)[0]
        ends[method] = (run.passes[0], run.passes[-1])
    assert ends["SGLD"][0] == pytest.approx(1.0, rel=1e-9)  # the first draw after one epoch (its last batch has 3)
    assert ends["SGLD"][1] == pytest.approx(13.0, rel=1e-9)
    assert ends["SAGA-LD"] == ends["SGLD"]
    # the snapshot at step 0, then per step two gradients per example, and a snapshot every 43 steps
    # a draw every 14 steps; at step 0, θ = θ̃: B gradients (no second one at the snapshot) and the snapshot
    assert ends["SVRG-LD"][0] == pytest.approx(1 + (32 + 13 * 2 * 32) / 1347, rel=1e-9)
    assert 12.0 <= ends["SVRG-LD"][1] <= 12.0 + 3.2 + 1 + 1  # an epoch, the first snapshot and a draw's 14 steps
    assert ends["SGLD-CV"][0] > 6.0 and 12.0 <= ends["SGLD-CV"][1] <= 12.0 + 2.1 + 0.5  # an epoch and a draw


def test_summary_of_a_demo_file(demo_run, capsys):
    capsys.readouterr()
    assert main(["summary", str(demo_run / "cold_saga-ld.nc")]) == 0
    out = capsys.readouterr().out
    for text in (f"{QUICK.num_chains} chains x", "sampling time", "az.summary", "accuracy", "test_loglik", "r_hat",
                 "skipped 1 non-scalar variable", "probs [450x10]", "divergences", "data_passes (final)",
                 "test log predictive density"):
        assert text in out, text
    assert "elpd_loo" not in out  # the demo's log_likelihood is the test set's: no PSIS-LOO label on it
    assert main(["summary", str(demo_run / "cold_sgld.nc"), "--var", "test_loglik"]) == 0
    out = capsys.readouterr().out
    assert "az.summary of 1 variable" in out and "test_loglik" in out and "skipped 3" in out


def test_summary_refuses_what_it_cannot_read(demo_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["summary", str(tmp_path / "missing.nc")]) == 2
    assert "no such file" in capsys.readouterr().err
    text = tmp_path / "notes.nc"
    text.write_text("not a netCDF file\n")
    assert main(["summary", str(text)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["summary", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["summary", str(demo_run / "cold_sgld.nc"), "--var", "nope"]) == 2
    assert "no posterior variable" in capsys.readouterr().err


def test_console_script_summary_exit_code(tmp_path):
    import os
    import shutil
    import subprocess
    import sysconfig

    exe = shutil.which("vr-mcmc", path=sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None
    result = subprocess.run([exe, "summary", str(tmp_path / "missing.nc")], capture_output=True, text=True)
    assert result.returncode == 2 and "no such file" in result.stderr


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--chains", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--passes", "2", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)])
