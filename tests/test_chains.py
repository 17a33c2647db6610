"""The chain manager `vr_mcmc.sample` and `vr_mcmc.Recorder` (issue 6): ArviZ output, checkpoint/resume."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import arviz as az
import chain_job
import numpy as np
import pytest
import torch
import xarray as xr

import torch_sample
import vr_mcmc
from vr_mcmc.chains import chain_seeds

HERE = Path(__file__).resolve().parent


def same_draws(a, b, groups=("posterior", "sample_stats", "log_likelihood")) -> None:
    for group in groups:
        da, db = a[group], b[group]
        assert set(da.data_vars) == set(db.data_vars), group
        for name in da.data_vars:
            # sampling_time differs; every recorded number must not
            np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=f"{group}/{name}")


def tree_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


@pytest.fixture(scope="module")
def hmc_run():
    return chain_job.run(sampler="hmc", num_samples=200, num_warmup=150)


def test_output_works_with_arviz(hmc_run, tmp_path):
    idata = hmc_run
    assert isinstance(idata, az.InferenceData)
    assert set(idata.groups()) == {"posterior", "sample_stats", "log_likelihood", "observed_data"}
    assert idata.posterior["weight"].dims == ("chain", "draw", "weight_dim_0", "weight_dim_1")
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 200
    stats = idata.sample_stats
    for key in ("lp", "acceptance_rate", "step_size", "diverging", "energy", "n_steps", "grad_evals"):
        assert key in stats, key
    assert stats["diverging"].dtype == bool
    assert idata.log_likelihood["obs"].shape == (2, 200, chain_job.N)
    for attr in ("inference_library", "inference_library_version", "sampling_time", "tuning_steps", "created_at"):
        assert attr in idata.posterior.attrs, attr
    assert idata.posterior.attrs["tuning_steps"] == 150

    summary = az.summary(idata, var_names=["weight", "bias"])
    assert len(summary) == 4 and (summary["r_hat"] < 1.1).all()
    assert float(az.rhat(idata)["bias"].max()) < 1.1
    assert float(az.ess(idata)["bias"].min()) > 20
    # The recorded log-likelihood and lp are those of the recorded draws, recomputed here in NumPy.
    w, b = idata.posterior["weight"].values[:, :, 0], idata.posterior["bias"].values
    logits = np.einsum("cdj,nj->cdn", w, chain_job.X.numpy()) + b
    y = chain_job.Y.numpy()
    log_lik = y * logits - np.logaddexp(0, logits)
    np.testing.assert_allclose(idata.log_likelihood["obs"].values, log_lik, rtol=0, atol=1e-5)
    log_prior = -(w**2).sum(-1) / 8 - (b**2).sum(-1) / 8  # Normal(2.0) on every parameter, up to a constant
    offset = stats["lp"].values - (log_lik.sum(-1) + log_prior)
    assert offset.std() < 1e-4, offset.std()  # lp = log density at the draw up to one constant (float32 sums)
    # az.loo reads the layout (chain, draw, observation): its PSIS estimate matches plain importance-sampling
    # LOO from the same draws (Pareto smoothing only trims the largest weights; all k below 0.7 here).
    loo = az.loo(idata, pointwise=True)
    draws = log_lik.reshape(-1, chain_job.N)
    is_loo = float(np.sum(np.log(draws.shape[0]) - np.logaddexp.reduce(-draws, axis=0)))
    assert loo.n_data_points == chain_job.N and float(loo.pareto_k.max()) < 0.7
    assert abs(loo.elpd_loo - is_loo) < 0.25, (loo.elpd_loo, is_loo)
    import matplotlib

    matplotlib.use("Agg")
    axes = az.plot_trace(idata, var_names=["bias"])
    assert axes.shape == (1, 2)
    path = tmp_path / "run.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    same_draws(idata, back)
    np.testing.assert_array_equal(back.observed_data["y"].values, chain_job.Y.numpy())


def test_hmc_draws_match_the_in_loop_sampler(hmc_run):
    """The driver adds nothing of its own: chain 0 equals a hand-written loop with the same seeds."""
    torch.manual_seed(chain_seeds(3, 0)[0])
    model = chain_job.model_fn()
    sampler = chain_job.hmc(model)
    closure_batch = (chain_job.X, chain_job.Y)

    def closure():
        sampler.zero_grad()
        loss = chain_job.loss_fn(model, closure_batch)
        loss.backward()
        return loss

    sampler.adapt(True, num_warmup=150)
    for _ in range(150):
        sampler.step(closure)
    sampler.adapt(False)
    bias = []
    for _ in range(200):
        sampler.step(closure)
        bias.append(float(model.bias.detach()))
    np.testing.assert_allclose(hmc_run.posterior["bias"].values[0, :, 0], bias, rtol=0, atol=1e-6)


def test_closure_estimators_get_an_lbfgs_style_closure():
    """SVRG-LD (T = 0) through the driver equals the documented loop: step(closure, indices=idx) with a
    closure that zeroes the gradients, computes the batch loss and calls backward."""
    from vr_mcmc.chains import _IndexStream

    idata = chain_job.run(None, "svrg", num_chains=1, num_warmup=0, num_samples=15)
    torch_seed, stream_seed = chain_seeds(3, 0)
    torch.manual_seed(torch_seed)
    model = chain_job.model_fn()
    sampler = chain_job.svrgld_sgd(model)
    stream = _IndexStream(chain_job.N, 20, stream_seed)
    weights = []
    for _ in range(15):
        idx = stream.next()

        def closure(idx=idx):
            sampler.zero_grad()
            loss = chain_job.loss_fn(model, (chain_job.X[idx], chain_job.Y[idx]))
            loss.backward()
            return loss

        sampler.step(closure, indices=idx)
        weights.append(model.weight.detach().clone())
    np.testing.assert_allclose(idata.posterior["weight"].values[0], torch.stack(weights).numpy(), rtol=0, atol=1e-6)


def test_checkpointed_run_equals_in_memory_run_and_is_read_back(tmp_path):
    in_memory = chain_job.run(None, "sagald", num_samples=60)
    on_disk = chain_job.run(tmp_path / "run", "sagald", num_samples=60)
    same_draws(in_memory, on_disk)
    digest = tree_digest(tmp_path / "run")
    again = chain_job.run(tmp_path / "run", "sagald", num_samples=60)  # finished: read back, nothing rewritten
    same_draws(on_disk, again)
    assert tree_digest(tmp_path / "run") == digest


def test_kill_and_resume_gives_the_uninterrupted_draws(tmp_path):
    """SIGKILL a SAGA-LD run (its gradient table is part of the state) mid-way, resume, compare."""
    directory = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "chain_job.py"), str(directory), "sagald", "600"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (directory / "chain_0.000003.nc").exists():  # 4 blocks of draws of chain 0 are on disk
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job made no progress in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (directory / "results.nc").exists()
    resumed = chain_job.run(directory, "sagald", num_samples=600)
    uninterrupted = chain_job.run(None, "sagald", num_samples=600)
    same_draws(resumed, uninterrupted)


def test_other_or_damaged_checkpoints_are_refused_and_left_alone(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    chain_job.run(directory, "sgld", num_samples=30)
    digest = tree_digest(directory)
    with pytest.raises(vr_mcmc.CheckpointError, match=r"holds another run.*num_samples: saved 30, asked 40"):
        chain_job.run(directory, "sgld", num_samples=40)
    assert tree_digest(directory) == digest

    directory = tmp_path / "unmerged"
    with monkeypatch.context() as m:  # as if it had died before merging
        m.setattr("vr_mcmc.chains.sampling._finish", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            chain_job.run(directory, "sgld", num_samples=30)
    (directory / "chain_0.pt").write_bytes(b"not a checkpoint")
    digest = tree_digest(directory)
    with pytest.raises(vr_mcmc.CheckpointError, match=r"chain_0\.pt cannot be read"):
        chain_job.run(directory, "sgld", num_samples=30)
    assert tree_digest(directory) == digest

    (directory / "manifest.json").write_text("{broken")
    with pytest.raises(vr_mcmc.CheckpointError, match=r"manifest\.json is damaged"):
        chain_job.run(directory, "sgld", num_samples=30)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(vr_mcmc.CheckpointError, match="not a vr_mcmc run"):
        chain_job.run(foreign, "sgld", num_samples=30)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_parallel_chains_give_the_sequential_draws():
    sequential = chain_job.run(None, "sgld", num_samples=40)  # one thread, as the worker processes
    parallel = chain_job.run(None, "sgld", num_samples=40, chain_method="parallel")
    same_draws(sequential, parallel)


def test_thin_warmup_and_record_functions():
    """num_samples counts post-warmup steps and thin keeps every thin-th, as NumPyro and Stan: 20 // 3 = 6 draws."""
    idata = chain_job.run(None, "sgld", num_samples=20, thin=3, save_warmup=True,
                          record={"w_norm": lambda m: m.weight.norm(), "logits": lambda m: m(chain_job.X[:5])})
    assert idata.posterior.sizes["draw"] == 6
    every = chain_job.run(None, "sgld", num_samples=20, record={"w_norm": lambda m: m.weight.norm()})
    # the kept draws are the 3rd, 6th, ..., 18th post-warmup steps of the same chain
    np.testing.assert_array_equal(idata.posterior["w_norm"].values, every.posterior["w_norm"].values[:, 2::3])
    assert idata.warmup_posterior.sizes["draw"] == 50 // 3
    assert idata.posterior["logits"].dims == ("chain", "draw", "logits_dim_0", "logits_dim_1")
    assert set(idata.posterior.data_vars) == {"w_norm", "logits"}
    assert "warmup_sample_stats" in idata.groups()


def test_large_models_record_no_parameters_by_default():
    def big():
        return torch.nn.Sequential(torch.nn.Linear(chain_job.D, 3000), torch.nn.Linear(3000, 1))

    with pytest.warns(UserWarning, match="recording none of them by default.*record="):
        idata = vr_mcmc.sample(big, chain_job.sgld, chain_job.loss_fn, (chain_job.X, chain_job.Y), batch_size=20,
                               num_chains=1, num_warmup=0, num_samples=3, progress=False)
    assert "posterior" not in idata.groups() and idata.sample_stats.sizes["draw"] == 3


def test_recorder_in_a_users_loop():
    """Each recorded draw is the model's state after that step, in its chain's row, and so are its
    log-likelihood and its statistics."""
    recorder = vr_mcmc.Recorder(record=["bias"], log_likelihood=chain_job.log_likelihood)
    biases, log_liks = [[], []], [[], []]
    for chain in range(2):
        torch.manual_seed(chain)
        model = chain_job.model_fn()
        sampler = chain_job.sgld(model)
        for _ in range(15):
            sampler.zero_grad()
            loss = chain_job.loss_fn(model, (chain_job.X, chain_job.Y))
            loss.backward()
            sampler.step(loss=loss)
            recorder.record(chain, model, sampler)
            biases[chain].append(model.bias.detach().clone())
            with torch.no_grad():
                log_liks[chain].append(chain_job.log_likelihood(model))
    idata = recorder.to_arviz()
    assert idata.posterior["bias"].dims == ("chain", "draw", "bias_dim_0")
    np.testing.assert_array_equal(idata.posterior["bias"].values, torch.stack([torch.stack(b) for b in biases]).numpy())
    np.testing.assert_array_equal(idata.log_likelihood["obs"].values,
                                  torch.stack([torch.stack(ll) for ll in log_liks]).numpy())
    assert (idata.sample_stats["step_size"].values == 2e-3).all()  # chain_job.sgld's lr
    with pytest.raises(ValueError, match="not parameters of the model"):
        vr_mcmc.Recorder(record=["nope"]).record(0, chain_job.model_fn())


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(num_samples=0), ValueError, "num_samples must be an integer >= 1"),
        (dict(thin=0), ValueError, "thin"),
        (dict(thin=50, num_samples=20), ValueError, "so no draw"),
        (dict(batch_size=1000), ValueError, "larger than the data"),
        (dict(chain_method="threads"), ValueError, "chain_method"),
        (dict(record=["nope"]), ValueError, "not parameters of the model"),
        (dict(record=42), TypeError, "record must be"),
        (dict(log_likelihood="obs"), TypeError, "log_likelihood must be"),
    ],
)
def test_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        chain_job.run(None, "sgld", **{"num_samples": 5, **change})


def test_bad_functions():
    with pytest.raises(TypeError, match="model_fn"):
        vr_mcmc.sample(None, chain_job.sgld, chain_job.loss_fn, (chain_job.X, chain_job.Y), batch_size=5,
                       num_warmup=0, num_samples=2)
    with pytest.raises(ValueError, match="share their first"):
        vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, chain_job.loss_fn, (chain_job.X, chain_job.Y[:5]),
                       batch_size=5, num_warmup=0, num_samples=2)

    def vector_loss(model, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(model(batch[0]).squeeze(-1), batch[1],
                                                                    reduction="none")

    with pytest.raises(TypeError, match="one-element tensor"):
        vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, vector_loss, (chain_job.X, chain_job.Y), batch_size=5,
                       num_warmup=0, num_samples=2, progress=False)


def _without_time(ds: xr.Dataset) -> xr.Dataset:
    """The dataset without what differs between two runs of the same arguments: times and the run's id."""
    out = ds.copy()
    out.attrs = {k: v for k, v in ds.attrs.items() if k not in ("created_at", "sampling_time", "run_id")}
    return out


@pytest.mark.parametrize("checkpoint", [False, True], ids=["in-memory", "from-disk"])
def test_arviz_1_datatree_holds_the_same_groups_as_arviz_0(monkeypatch, tmp_path, checkpoint):
    """The ArviZ 1.x path (xarray.DataTree; ArviZ 1.x itself needs Python >= 3.12) run against the
    installed xarray's DataTree: same seed, so every group must be identical, values, coordinates
    and attributes (but the creation and sampling times), to the ArviZ 0.x InferenceData that ArviZ reads. From
    disk, the merged results file is opened with xr.open_datatree."""
    import vr_mcmc.chains.checkpoint
    import vr_mcmc.recorder

    options = dict(num_samples=20, checkpoint=str(tmp_path / "zero") if checkpoint else None)
    reference = chain_job.run(sampler="sgld", **options)
    assert isinstance(reference, az.InferenceData)
    for module in (vr_mcmc.chains.checkpoint, vr_mcmc.recorder):  # every module that asks which ArviZ it is
        monkeypatch.setattr(module, "arviz_major", lambda: 1)
    options["checkpoint"] = str(tmp_path / "one") if checkpoint else None
    tree = chain_job.run(sampler="sgld", **options)
    assert isinstance(tree, xr.DataTree)
    assert sorted(tree.children) == sorted(reference.groups())
    for group in reference.groups():
        xr.testing.assert_identical(_without_time(tree[group].to_dataset()), _without_time(reference[group]))
    assert tree["posterior"]["bias"].dims == ("chain", "draw", "bias_dim_0")

    recorder = vr_mcmc.Recorder(record=["bias"])
    model = chain_job.model_fn()
    recorder.record(0, model)
    recorded = recorder.to_arviz()
    assert isinstance(recorded, xr.DataTree) and recorded["posterior"]["bias"].shape == (1, 1, 1)
    torch.testing.assert_close(torch.as_tensor(recorded["posterior"]["bias"].values[0, 0]), model.bias.detach())


def test_user_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain_job.run(None, "sgld", num_samples=5)
    assert torch.equal(torch.rand(3), expected)


def test_ula_runs_through_sample_with_a_warmup():
    """ULA has no acceptance rate: the driver must not ask it to adapt (it raised before), its step
    size stays ``lr`` through the warmup, and its posterior mean (full-data Langevin, bias O(h))
    agrees with HMC's (an exact sampler) on the same model to within 0.25, about 4 MC SEs of the
    difference at these run lengths (posterior sds ~0.25, ESS of ULA's 2×300 autocorrelated draws
    ≥ ~50; ULA's relaxation time σ²/h is ~7 steps, well inside the 100 warmup steps)."""
    ula = chain_job.run(None, "ula", num_samples=300, num_warmup=100, save_warmup=True)
    assert (ula.sample_stats["step_size"].values == 1e-2).all()
    assert (ula.warmup_sample_stats["step_size"].values == 1e-2).all()
    hmc = chain_job.run(None, "hmc", num_samples=300, num_warmup=100)
    for name in ("weight", "bias"):
        diff = ula.posterior[name].mean(("chain", "draw")) - hmc.posterior[name].mean(("chain", "draw"))
        assert float(abs(diff).max()) < 0.25, (name, diff.values)


def test_ula_refuses_options_it_would_ignore():
    theta = torch.zeros(2, requires_grad=True)
    for option in (dict(target_accept=0.6), dict(max_energy_error=10.0), dict(dense_mass=True)):
        with pytest.raises(TypeError):
            torch_sample.ULA([theta], lr=0.1, **option)


def test_sgld_posterior_mean_agrees_with_hmc(hmc_run):
    """The minibatch path end to end: SGLD's posterior means (2 chains × 3,000 draws after 500 warmup;
    its relaxation time σ²/h is ~100 steps, ESS 30-90) agree with HMC's (an exact sampler, ESS 240-440)
    within 4 of the difference's Monte Carlo standard errors (ArviZ's MCSEs, combined). SGLD's own
    bias at h = 2e-3 is O(h), a few thousandths here, well below those MCSEs (0.03-0.07)."""
    sgld = chain_job.run(None, "sgld", num_samples=3000, num_warmup=500, log_likelihood=None)
    for name in ("weight", "bias"):
        diff = (sgld.posterior[name].mean(("chain", "draw")) - hmc_run.posterior[name].mean(("chain", "draw"))).values
        se = np.hypot(az.mcse(sgld, var_names=[name])[name].values, az.mcse(hmc_run, var_names=[name])[name].values)
        assert (np.abs(diff) <= 4 * se).all(), (name, diff, se)
