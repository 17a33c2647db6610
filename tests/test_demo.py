"""`vr-mcmc demo --quick` end to end (files, ArviZ reads them) and `vr-mcmc summary` on its output and on bad files."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("sklearn")
az = pytest.importorskip("arviz")

from vr_mcmc.cli import main  # noqa: E402
from vr_mcmc.demo import CountingSVRGLD  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FILES = ("sgld.nc", "saga-ld.nc", "svrg-ld.nc")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo gives back the thread setting it changed
    return out


def test_demo_writes_results_report_and_plots(demo_run, capsys):
    for name in (*FILES, "report.txt"):
        assert (demo_run / name).stat().st_size > 0, name
    report = (demo_run / "report.txt").read_text()
    for text in ("=== Comparison", "SGLD", "SAGA-LD", "SVRG-LD", "r_hat", "ess_bulk", "p_true["):
        assert text in report
    if HAS_MATPLOTLIB:
        for name in ("trace_sgld.png", "rank_svrg-ld.png", "accuracy_vs_passes.png"):
            assert (demo_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")
@pytest.mark.parametrize("name", FILES)
def test_demo_files_are_arviz_data(demo_run, name):
    idata = az.from_netcdf(str(demo_run / name))
    post = idata.posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 12
    assert post["probs"].shape == (2, 12, 450, 10)
    probs = post["probs"].values  # packed as uint16 on disk, unpacked on reading
    assert np.all((probs >= 0) & (probs <= 1)) and np.allclose(probs.sum(-1), 1, atol=1e-3)
    y = idata.observed_data["obs"].values
    loglik = idata.log_likelihood["obs"].values
    p_true = np.take_along_axis(probs, np.broadcast_to(y[None, None, :, None], (2, 12, 450, 1)), -1)[..., 0]
    np.testing.assert_allclose(np.exp(loglik), p_true, atol=2e-5)
    np.testing.assert_allclose(post["test_loglik"].values, loglik.astype(np.float64).mean(-1), rtol=1e-5)
    assert 0.5 < float(post["accuracy"].mean()) <= 1
    assert float(idata.posterior.attrs["sampling_time"]) > 0
    passes = idata.sample_stats["data_passes"].values
    assert np.all(np.diff(passes, axis=1) > 0)
    assert "warmup_posterior" in idata.groups()
    az.summary(idata, var_names=["accuracy", "test_loglik"])
    assert math.isfinite(float(az.loo(idata)["elpd_loo"]))


def test_data_passes_count_the_gradients(demo_run):
    """quick run: N = 1347, batch 64 (22 steps an epoch), 2 epochs of warmup, 12 draws every 4 steps."""
    steps = 2 * 22 + 12 * 4
    passes = {n: az.from_netcdf(str(demo_run / n)).sample_stats["data_passes"].values[:, -1] for n in FILES}
    np.testing.assert_allclose(passes["sgld.nc"], steps / 22 * 1.0, rtol=0.05)  # one pass per epoch
    np.testing.assert_allclose(passes["saga-ld.nc"], passes["sgld.nc"])
    # SVRG-LD: two gradients per example of a batch and a full pass (snapshot) every epoch
    expected = 2 * passes["sgld.nc"] + math.ceil(steps / 22)
    np.testing.assert_allclose(passes["svrg-ld.nc"], expected, rtol=0.05)


def test_summary_of_a_demo_file(demo_run, capsys):
    capsys.readouterr()
    assert main(["summary", str(demo_run / "saga-ld.nc")]) == 0
    out = capsys.readouterr().out
    for text in ("2 chains x 12 draws", "sampling time", "az.summary", "accuracy", "test_loglik", "r_hat",
                 "skipped 1 non-scalar variable", "probs [450x10]", "divergences", "data_passes", "elpd_loo"):
        assert text in out, text
    assert main(["summary", str(demo_run / "sgld.nc"), "--var", "test_loglik"]) == 0
    out = capsys.readouterr().out
    assert "az.summary of 1 variable" in out and "test_loglik" in out and "skipped 2" in out


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
    assert main(["summary", str(demo_run / "sgld.nc"), "--var", "nope"]) == 2
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
        main(["demo", "--quick", "--samples", "2", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)])


def test_svrg_in_the_demo_zeroes_gradients_in_its_closure():
    """A closure that only backpropagates (as a driver that already ran backward may pass) gives the
    same SVRG-LD steps as the documented closure that zeroes the gradients first."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)

    def run(zero_first: bool, cls):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        sampler = cls(model.parameters(), 1e-2, 40, 5, [(torch.arange(40), x, y)],
                      lambda a, b: F.cross_entropy(model(a), b), temperature=0)
        for k in range(7):
            idx = torch.arange(5 * k, 5 * k + 5)
            sampler.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()

            def closure(idx=idx):
                if zero_first:
                    sampler.zero_grad()
                out = F.cross_entropy(model(x[idx]), y[idx])
                out.backward()
                return out

            sampler.step(closure, indices=idx, loss=loss.detach())
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    import torch_sample

    torch.testing.assert_close(run(False, CountingSVRGLD), run(True, torch_sample.SVRGLD), rtol=0, atol=0)
