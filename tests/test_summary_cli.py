"""`vr-mcmc summary` (issue 16.9): data_passes as the final count, no LOO label on a held-out log predictive
density, a note on runs too short for R-hat and ESS."""

from __future__ import annotations

import re

import chain_job
import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from vr_mcmc import cli


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        idata = chain_job.run(None, "sgld", num_samples=40, num_warmup=20)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("summary") / "run.nc"
    idata.to_netcdf(str(path))
    return path, idata


def test_summary_reports_final_passes_lpd_and_a_short_run_note(run_file, capsys):
    path, idata = run_file
    assert cli.main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "too few for R-hat and ESS" in out  # 40 draws per chain
    row = next(line for line in out.splitlines() if line.startswith("data_passes (final)"))
    final = idata.sample_stats["data_passes"].values[:, -1]  # (20 + 40) steps of 20 of 120 examples: 10
    np.testing.assert_allclose(final, 10.0)
    assert [float(v) for v in row.split()[2:]] == pytest.approx(list(final), rel=1e-3)
    values = idata.log_likelihood["obs"].values.reshape(-1, chain_job.N)
    lpd = float((logsumexp(values, axis=0) - np.log(values.shape[0])).sum())
    match = re.search(r"log predictive density of the 120 observations in log_likelihood/obs: (-?[\d.]+)", out)
    assert match and float(match.group(1)) == pytest.approx(lpd, abs=0.01)
    assert "elpd_loo" not in out and "--loo computes it" in out


def test_summary_loo_on_request(run_file, capsys):
    path, _ = run_file
    assert cli.main(["summary", str(path), "--loo"]) == 0
    out = capsys.readouterr().out
    assert "PSIS-LOO (valid when log_likelihood holds the training data): elpd_loo" in out
