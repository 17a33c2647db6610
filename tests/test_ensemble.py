"""Posterior ensembles (issue 20): parameter draws kept by ``sample(keep_params=k)`` or a Recorder, and
`PosteriorEnsemble`'s predictive and scores, each checked against a hand computation (a float64 loop over the
draws loaded with safetensors' own API, NumPy loops for ECE and Brier), az.loo, and real SIGKILLs."""

from __future__ import annotations

import hashlib
import json
import math
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
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
import vr_mcmc
from vr_mcmc.data import IndexedDataset
from vr_mcmc.ensemble import brier_score, calibration_bins, expected_calibration_error

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


# -- a small classifier, sampled once ------------------------------------------------------------------------------

N, D, K = 90, 4, 3
_gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_gen)
Y = ((X[:, 0] > 0).long() + (X[:, 1] > 0.5).long())
X_TEST = torch.randn(37, D, generator=_gen)
Y_TEST = torch.randint(0, K, (37,), generator=_gen)


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, K))


def sgld(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.SGLD(model.parameters(), lr=2e-2, num_data=N, prior=torch_sample.priors.Normal(1.0))


def cross_entropy(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


RUN = dict(batch_size=30, num_warmup=10, num_samples=24, thin=2, num_chains=2, checkpoint_every=5, keep_params=3,
           seed=1, progress=False)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ensemble") / "run"
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        idata = vr_mcmc.sample(mlp, sgld, cross_entropy, (X, Y), checkpoint=directory, **RUN)
    return directory, idata


def by_hand(directory: Path) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
    """(chain, draw, state dict) of every parameter file, read with safetensors' own API, in chain/draw order."""
    out = []
    for path in sorted((directory / "params").iterdir(), key=lambda p: (int(p.name.split(".")[0][6:]), p.name)):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        meta = json.loads(meta["vr_mcmc"])
        assert meta["format"] == "vr_mcmc.ensemble/1"
        out.append((meta["chain"], meta["draw"], load_file(str(path))))
    return out


def hand_probs(directory: Path, x: torch.Tensor) -> np.ndarray:
    """[S, n, K] softmax of each draw, one fresh float64 model per draw (the ensembles under test get a float64
    model too, so that the comparison is exact to float64 rounding, not float32's)."""
    probs = []
    for _, _, state in by_hand(directory):
        model = mlp().double()
        model.load_state_dict(state)
        with torch.no_grad():
            probs.append(model(x.double()).softmax(-1).numpy())
    return np.stack(probs)


# -- what is kept ----------------------------------------------------------------------------------------------


def test_every_kth_draw_is_kept_and_equals_the_recorded_posterior(classifier):
    directory, idata = classifier
    ensemble = vr_mcmc.PosteriorEnsemble(directory, mlp())
    draws = RUN["num_samples"] // RUN["thin"]  # 12 draws per chain, every 3rd kept: draws 2, 5, 8, 11
    assert len(ensemble) == 8 and ensemble.draws_per_chain == [4, 4]
    assert ensemble.draw_indices == [(c, d) for c in range(2) for d in range(2, draws, 3)]
    hand = by_hand(directory)
    assert [(c, d) for c, d, _ in hand] == ensemble.draw_indices
    for i, (c, d, state) in enumerate(hand):
        assert set(ensemble[i]) == set(mlp().state_dict())
        for key, value in state.items():
            assert torch.equal(ensemble[i][key], value)
            # the model's parameters at that draw, as the posterior group recorded them (a model under 10k numbers)
            np.testing.assert_array_equal(idata.posterior[key].values[c, d], value.numpy())
    assert [s["0.weight"] for s in ensemble][5].equal(ensemble[5]["0.weight"]) and ensemble[-1]["2.bias"].equal(
        hand[-1][2]["2.bias"])


def test_predict_is_the_mean_of_the_draws_predictions_by_hand(classifier):
    directory, _ = classifier
    probs = hand_probs(directory, X_TEST)
    ensemble = vr_mcmc.PosteriorEnsemble(directory, mlp().double(), batch_size=10)  # inputs in 4 batches
    np.testing.assert_allclose(ensemble.predict(X_TEST.double()).numpy(), probs.mean(0), rtol=0, atol=1e-12)
    # the float32 model the run sampled: the same to float32 rounding of the logits
    float32 = vr_mcmc.PosteriorEnsemble(directory, mlp()).predict(X_TEST).numpy()
    np.testing.assert_allclose(float32, probs.mean(0), rtol=0, atol=1e-6)
    mean = probs.mean(0)
    total = -(mean * np.log(mean)).sum(-1)
    aleatoric = -(probs * np.log(probs)).sum(-1).mean(0)
    entropy, ale, epi = ensemble.predictive_entropy(X_TEST.double(), decompose=True)
    np.testing.assert_allclose(ensemble.predictive_entropy(X_TEST.double()).numpy(), total, atol=1e-12)
    np.testing.assert_allclose(entropy.numpy(), total, atol=1e-12)
    np.testing.assert_allclose(ale.numpy(), aleatoric, atol=1e-12)
    np.testing.assert_allclose(epi.numpy(), total - aleatoric, atol=1e-12)
    assert (epi.numpy() > -1e-12).all()  # a mutual information


def _ece_loop(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    ece, n = 0.0, len(labels)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if (lo < probs[i].max() <= hi) or (b == 0 and probs[i].max() == 0)]
        if members:
            acc = sum(int(np.argmax(probs[i]) == labels[i]) for i in members) / len(members)
            conf = sum(probs[i].max() for i in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
    return ece


def _brier_loop(probs: np.ndarray, labels: np.ndarray) -> float:
    return sum(sum((probs[i, k] - (k == labels[i])) ** 2 for k in range(probs.shape[1]))
               for i in range(len(labels))) / len(labels)


def test_evaluate_against_numpy_loops_for_every_data_form(classifier):
    directory, _ = classifier
    probs = hand_probs(directory, X_TEST)
    y = Y_TEST.numpy()
    mean = probs.mean(0)
    loglik = np.mean([math.log(np.mean([probs[s, i, y[i]] for s in range(len(probs))])) for i in range(len(y))])
    expected = {"log_likelihood": loglik, "accuracy": float(np.mean(mean.argmax(-1) == y)),
                "ece": _ece_loop(mean, y, 15), "brier": _brier_loop(mean, y)}
    ensemble = vr_mcmc.PosteriorEnsemble(directory, mlp().double(), batch_size=16)
    x = X_TEST.double()
    loaders = [(x, Y_TEST), (x.numpy(), y), DataLoader(TensorDataset(x, Y_TEST), batch_size=7),
               DataLoader(IndexedDataset(TensorDataset(x, Y_TEST)), batch_size=9)]  # yields (idx, x, y)
    for data in loaders:
        scores = ensemble.evaluate(data)
        assert scores["num_draws"] == 8 and scores["num_obs"] == 37
        for key, value in expected.items():
            assert scores[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert expected["ece"] > 0.01 and expected["brier"] > 0.1  # not a degenerate case


def test_ece_and_brier_against_numpy_loops():
    rng = np.random.default_rng(3)
    for n, k, bins in ((200, 5, 15), (57, 2, 10), (40, 10, 1)):
        probs = rng.dirichlet(np.full(k, 0.5), size=n)
        labels = rng.integers(0, k, size=n)
        assert expected_calibration_error(probs, labels, bins) == pytest.approx(_ece_loop(probs, labels, bins),
                                                                                 abs=1e-12)
        assert brier_score(probs, labels) == pytest.approx(_brier_loop(probs, labels), abs=1e-12)
    # right-closed bins: a confidence of exactly 0.5 with 4 bins (exact edges) is in (0.25, 0.5]
    probs = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    bins = calibration_bins(probs, [0, 1, 2], bins=4)
    np.testing.assert_array_equal(bins["count"], [0, 2, 0, 1])
    np.testing.assert_allclose(bins["accuracy"][[1, 3]], [1.0, 0.0])
    np.testing.assert_allclose(bins["confidence"][[1, 3]], [0.5, 0.9])
    assert expected_calibration_error(probs, [0, 1, 2], 4) == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.9)


def test_az_loo_reads_the_ensembles_log_likelihood(tmp_path):
    # 2 x 30 draws: ArviZ 1.x's PSIS needs at least 5 draws in the tail, min(S/5, 3 sqrt(S)) (S >= 25)
    directory = tmp_path / "run"
    vr_mcmc.sample(mlp, sgld, cross_entropy, (X, Y), checkpoint=directory, **{**RUN, "num_samples": 60, "thin": 1,
                                                                                 "keep_params": 2})
    ensemble = vr_mcmc.PosteriorEnsemble(directory, mlp().double())
    idata = ensemble.to_arviz((X_TEST.double(), Y_TEST))
    probs = hand_probs(directory, X_TEST)  # [S, n, K], chains in order
    y = Y_TEST.numpy()
    hand = np.log(probs[:, np.arange(len(y)), y]).reshape(2, 30, len(y))
    np.testing.assert_allclose(idata.log_likelihood["y"].values, hand, atol=1e-12)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    np.testing.assert_array_equal(idata.observed_data["y"].values, y)
    replicated = idata.posterior_predictive["y"].values
    assert replicated.shape == (2, 30, 37) and set(np.unique(replicated)) <= {0, 1, 2}
    again = ensemble.to_arviz((X_TEST.double(), Y_TEST)).posterior_predictive["y"].values
    np.testing.assert_array_equal(replicated, again)  # seeded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PSIS on 60 draws: ArviZ warns that the Pareto shapes are large
        loo = az.loo(idata)
    elpd = float(loo.elpd_loo if hasattr(loo, "elpd_loo") else loo.elpd)  # ArviZ 0.x / 1.x names
    p_loo = float(loo.p_loo if hasattr(loo, "p_loo") else loo.p)
    # lppd = elpd_loo + p_loo = Σ_i log mean_s p(y_i | θ_s): what evaluate gives per observation
    assert elpd + p_loo == pytest.approx(37 * ensemble.evaluate((X_TEST.double(), Y_TEST))["log_likelihood"],
                                         rel=1e-9)


# -- regression ----------------------------------------------------------------------------------------------


def _gaussian_ensemble(directory: Path, outputs: int, draws: int = 5) -> list[dict[str, torch.Tensor]]:
    """A Recorder's ensemble of random draws of a Linear(D, outputs) regression model (2 chains)."""
    recorder = vr_mcmc.Recorder(record=[], keep_params=1, directory=directory)
    states = []
    for chain in range(2):
        for s in range(draws):
            torch.manual_seed(100 * chain + s)
            model = torch.nn.Linear(D, outputs)
            recorder.record(chain, model)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    recorder.save_ensemble()
    return states


def test_gaussian_predictive_mean_variance_and_log_likelihood_by_hand(tmp_path):
    states = _gaussian_ensemble(tmp_path / "het", outputs=2)  # (mean, log-variance)
    x, y = X_TEST.double(), torch.randn(37, generator=torch.Generator().manual_seed(5)).double()
    mus, variances = [], []
    for state in states:
        out = F.linear(x, state["weight"].double(), state["bias"].double())
        mus.append(out[:, 0].numpy())
        variances.append(out[:, 1].exp().numpy())
    mus, variances = np.stack(mus), np.stack(variances)
    model = torch.nn.Linear(D, 2).double()
    ensemble = vr_mcmc.PosteriorEnsemble(tmp_path / "het", model, likelihood="gaussian")
    mean, var = ensemble.predict(x)
    np.testing.assert_allclose(mean.numpy(), mus.mean(0), atol=1e-12)
    np.testing.assert_allclose(var.numpy(), variances.mean(0) + mus.var(0), rtol=1e-10)  # total variance
    dens = np.exp(-0.5 * (np.log(2 * np.pi * variances) + (y.numpy() - mus) ** 2 / variances))
    scores = ensemble.evaluate((x, y))
    assert scores["log_likelihood"] == pytest.approx(np.log(dens.mean(0)).mean(), rel=1e-10)
    assert scores["rmse"] == pytest.approx(np.sqrt(((mus.mean(0) - y.numpy()) ** 2).mean()), rel=1e-10)
    idata = ensemble.to_arviz((x, y))
    np.testing.assert_allclose(idata.log_likelihood["y"].values, np.log(dens).reshape(2, 5, 37), rtol=1e-10)

    _gaussian_ensemble(tmp_path / "fixed", outputs=1)  # mean only, fixed noise sd 0.3: y [n, 1]
    ensemble = vr_mcmc.PosteriorEnsemble(tmp_path / "fixed", torch.nn.Linear(D, 1).double(), likelihood="gaussian",
                                         noise_std=0.3)
    mean, var = ensemble.predict(x)
    assert mean.shape == (37, 1)
    np.testing.assert_allclose(var.numpy()[:, 0], 0.09 + np.var([F.linear(x, s["weight"].double(),
                                                                          s["bias"].double())[:, 0].numpy()
                                                                 for s in _states_of(tmp_path / "fixed")], axis=0),
                               rtol=1e-10)
    with pytest.raises(ValueError, match=r"last axis to hold \(mean, log-variance\).*Give noise_std"):
        vr_mcmc.PosteriorEnsemble(tmp_path / "fixed", torch.nn.Linear(D, 1), likelihood="gaussian").predict(x.float())


def _states_of(directory: Path) -> list[dict[str, torch.Tensor]]:
    index = json.loads((directory / "ensemble.json").read_text())
    return [load_file(str(directory / e["file"])) for entries in index["chains"] for e in entries]


def test_buffers_int_tensors_and_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 4)
            self.norm = torch.nn.BatchNorm1d(4)
            self.out = torch.nn.Linear(4, 5, bias=False)
            self.out.weight = self.embed.weight  # tied: two state-dict keys, one storage

        def forward(self, idx):
            return self.out(self.norm(self.embed(idx)))

    torch.manual_seed(0)
    model = Tied()
    model(torch.randint(0, 5, (16,)))  # training mode: running statistics and num_batches_tracked move
    recorder = vr_mcmc.Recorder(record=[], keep_params=1, directory=tmp_path / "tied")
    recorder.record(0, model)
    recorder.save_ensemble()
    ensemble = vr_mcmc.PosteriorEnsemble(tmp_path / "tied", Tied())
    for key, value in model.state_dict().items():
        assert torch.equal(ensemble[0][key], value) and ensemble[0][key].dtype == value.dtype, key
    assert ensemble[0]["norm.num_batches_tracked"].item() == 1
    probs = ensemble.predict(torch.arange(5))
    model.eval()
    np.testing.assert_allclose(probs.numpy(), model(torch.arange(5)).double().softmax(-1).detach().numpy(), atol=1e-12)


def test_a_recorders_ensemble_in_your_own_loop(tmp_path):
    """Chains recorded in any order and numbered as the user likes; to_arviz() writes the index too."""
    recorder = vr_mcmc.Recorder(record=["weight"], keep_params=2, directory=tmp_path / "own")
    model = torch.nn.Linear(3, 2)
    for step in range(5):
        for chain in (2, 0):  # interleaved, chain 2 first
            with torch.no_grad():
                model.weight.fill_(10 * chain + step)
            recorder.record(chain, model)
    idata = recorder.to_arviz()
    ensemble = vr_mcmc.PosteriorEnsemble(tmp_path / "own", torch.nn.Linear(3, 2))
    assert ensemble.chain_ids == [0, 2] and ensemble.draw_indices == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert [float(s["weight"][0, 0]) for s in ensemble] == [1.0, 3.0, 21.0, 23.0]
    for i, (c, d) in enumerate(ensemble.draw_indices):  # the posterior group's chain c is at position [0, 2].index(c)
        np.testing.assert_array_equal(idata.posterior["weight"].sel(chain=c).values[d], ensemble[i]["weight"].numpy())
    with pytest.raises(ValueError, match="keeps no parameters: create it with keep_params=k, directory=DIR"):
        vr_mcmc.Recorder().save_ensemble()


@pytest.mark.slow  # two worker processes: ~15 s
def test_parallel_chains_keep_the_same_parameter_files(tmp_path, uninterrupted):
    chain_job.run(tmp_path / "run", "sgld", chain_method="parallel", **KILL_RUN)
    assert _tree(tmp_path / "run" / "params") == _tree(uninterrupted[0] / "params")
    assert (tmp_path / "run" / "ensemble.json").read_text() == (uninterrupted[0] / "ensemble.json").read_text()


# -- kill -9 during a parameter write ---------------------------------------------------------------------------

KILL_JOB = """
import os, sys, time, pathlib, chain_job
import vr_mcmc.chains.params as P
directory, point, at, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
calls = {"n": 0}
real_save, real_replace = P._save, os.replace

def pause():  # the test sends SIGKILL while this process waits here
    marker.write_text("ready")
    time.sleep(600)

def save(tensors, path, metadata):
    calls["n"] += 1
    if point == "mid-write" and calls["n"] == at:  # half of the file's bytes written, the file still open
        from safetensors.torch import save
        data = save(dict(tensors), metadata=dict(metadata))
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            pause()
    real_save(tensors, path, metadata)

def replace(src, dst):
    if str(dst).endswith(".safetensors") and calls["n"] == at and point == "before-rename":
        pause()
    real_replace(src, dst)
    if str(dst).endswith(".safetensors") and calls["n"] == at and point == "after-rename":
        pause()

P._save = save
os.replace = replace
chain_job.run(directory, "sgld", num_samples=40, keep_params=2, checkpoint_every=5)
"""

KILL_RUN = dict(num_samples=40, keep_params=2, checkpoint_every=5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clean") / "run"
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        idata = chain_job.run(directory, "sgld", **KILL_RUN)
    return directory, idata


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("point, at, left", [
    ("mid-write", 7, "params/chain_0.000013.safetensors.tmp"),     # chain 0's 14th draw; its checkpoint is at 10
    pytest.param("before-rename", 17, "params/chain_0.000033.safetensors.tmp", marks=pytest.mark.slow),  # ~10 s
    ("after-rename", 27, "params/chain_1.000013.safetensors"),     # chain 1, after chain 0 finished
])
def test_kill_during_a_parameter_write_resumes_with_every_draw_once(tmp_path, uninterrupted, point, at, left):
    directory, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", KILL_JOB, str(directory), point, str(at), str(marker)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never reached the write"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill -9, inside the write
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (directory / left).exists() and not (directory / "ensemble.json").exists()
    if point == "mid-write":
        assert (directory / left).stat().st_size < (uninterrupted[0] / left.removesuffix(".tmp")).stat().st_size

    resumed = chain_job.run(directory, "sgld", **KILL_RUN)  # the same call resumes
    clean_dir, clean = uninterrupted
    names = sorted(p.name for p in (directory / "params").iterdir())
    assert names == sorted(p.name for p in (clean_dir / "params").iterdir())  # nothing extra, no .tmp
    assert names == [f"chain_{c}.{d:06d}.safetensors" for c in range(2) for d in range(1, 40, 2)]
    assert _tree(directory / "params") == _tree(clean_dir / "params")  # the same bytes
    ensemble, reference = vr_mcmc.PosteriorEnsemble(directory, chain_job.model_fn()), \
        vr_mcmc.PosteriorEnsemble(clean_dir, chain_job.model_fn())
    assert len(ensemble) == 40 and ensemble.draw_indices == reference.draw_indices
    for a, b in zip(ensemble, reference):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(resumed.posterior["weight"].values, clean.posterior["weight"].values)
    # the draws kept are the posterior's draws 1, 3, ...: the parameters the posterior group recorded
    for (c, d), state in zip(ensemble.draw_indices, ensemble):
        np.testing.assert_array_equal(state["weight"].numpy(), clean.posterior["weight"].values[c, d])


def test_resume_with_keep_params_finished_run_and_lost_index(tmp_path, uninterrupted):
    clean_dir, _ = uninterrupted
    directory = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:  # dies at the end, before the merge: every chain done
        m.setattr("vr_mcmc.chains.sampling._finish", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            chain_job.run(directory, "sgld", **KILL_RUN)
    with pytest.raises(ValueError, match=r"has not finished.*call vr_mcmc.sample again with the same arguments"):
        vr_mcmc.PosteriorEnsemble(directory, chain_job.model_fn())
    chain_job.run(directory, "sgld", **KILL_RUN)
    assert _tree(directory / "params") == _tree(clean_dir / "params")
    index = (directory / "ensemble.json").read_text()
    digest = _tree(directory)
    chain_job.run(directory, "sgld", **KILL_RUN)  # finished: read back, nothing rewritten
    assert _tree(directory) == digest
    (directory / "ensemble.json").unlink()
    with pytest.raises(ValueError, match=r"finished .* ensemble.json is missing: call vr_mcmc.sample again"):
        vr_mcmc.PosteriorEnsemble(directory, chain_job.model_fn())
    chain_job.run(directory, "sgld", **KILL_RUN)  # written again from the chains' checkpoints
    assert (directory / "ensemble.json").read_text() == index
    for other in (dict(keep_params=4), dict(keep_params=None)):
        with pytest.raises(vr_mcmc.CheckpointError, match=f"keep_params: saved 2, asked {other['keep_params']}"):
            chain_job.run(directory, "sgld", **{**KILL_RUN, **other})
        assert _tree(directory) == digest


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, match", [
    (0, "keep_params must be an integer >= 1"), (-2, "keep_params must be an integer >= 1"),
    (1.5, "keep_params must be an integer >= 1"), (True, "got True"), ("2", "got '2'"),
    (21, "keep_params=21 saves every 21-th of the 20 draws per chain.*so none: use keep_params <= 20"),
])
def test_bad_keep_params_is_refused_before_anything_is_written(tmp_path, value, match):
    with pytest.raises(ValueError, match=match):
        chain_job.run(tmp_path / "run", "sgld", num_samples=40, thin=2, keep_params=value)
    assert not (tmp_path / "run").exists()


def test_keep_params_needs_a_directory():
    with pytest.raises(ValueError, match=r"keep_params=2 writes parameter draws to disk and needs a directory: "
                                         r"pass checkpoint='DIR'.*PosteriorEnsemble"):
        chain_job.run(None, "sgld", num_samples=10, keep_params=2)
    with pytest.raises(ValueError, match="needs a directory: pass directory='DIR'"):
        vr_mcmc.Recorder(keep_params=2)
    with pytest.raises(ValueError, match="give keep_params too"):
        vr_mcmc.Recorder(directory="somewhere")


def test_paths_that_are_not_ensembles_are_refused_with_the_fix(tmp_path, classifier):
    directory, _ = classifier
    with pytest.raises(FileNotFoundError, match="does not exist: give the checkpoint= directory"):
        vr_mcmc.PosteriorEnsemble(tmp_path / "nowhere", mlp())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not a posterior ensemble.*keep_params=k"):
        vr_mcmc.PosteriorEnsemble(tmp_path / "empty", mlp())
    with pytest.raises(ValueError, match=r"is a file: give the directory that holds ensemble.json"):
        vr_mcmc.PosteriorEnsemble(directory / "results.nc", mlp())
    assert len(vr_mcmc.PosteriorEnsemble(directory / "ensemble.json", mlp())) == 8  # its own index: the directory
    chain_job.run(tmp_path / "plain", "sgld", num_samples=10)
    with pytest.raises(ValueError, match=r"made without keep_params.*sample again with keep_params=k"):
        vr_mcmc.PosteriorEnsemble(tmp_path / "plain", chain_job.model_fn())
    recorder = vr_mcmc.Recorder(record=[], keep_params=1, directory=tmp_path / "unsaved")
    recorder.record(0, mlp())
    with pytest.raises(ValueError, match=r"no ensemble.json: a Recorder writes it with recorder.save_ensemble\(\)"):
        vr_mcmc.PosteriorEnsemble(tmp_path / "unsaved", mlp())
    with pytest.raises(ValueError, match="already holds an ensemble"):
        vr_mcmc.Recorder(keep_params=1, directory=directory)


class _OneLogit(torch.nn.Sequential):
    """The classifier's layers returning one number per input: not logits over classes."""

    def __init__(self):
        super().__init__(*mlp())

    def forward(self, x):
        return super().forward(x)[:, 0]


def test_another_architecture_or_not_a_module_is_refused_naming_the_keys(classifier):
    directory, _ = classifier
    digest = _tree(directory)
    wider = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, K))
    with pytest.raises(ValueError, match=r"another architecture.*shapes differ: 0\.weight: draws \(8, 4\), model "
                                         r"\(16, 4\); 0\.bias: draws \(8,\), model \(16,\); 2\.weight"):
        vr_mcmc.PosteriorEnsemble(directory, wider)
    deeper = torch.nn.Sequential(*mlp(), torch.nn.Linear(K, K))
    with pytest.raises(ValueError, match=r"keys only in the model: 3\.weight, 3\.bias.*model_fn\(\)"):
        vr_mcmc.PosteriorEnsemble(directory, deeper)
    with pytest.raises(ValueError, match=r"keys only in the draws: 2\.bias, 2\.weight"):
        vr_mcmc.PosteriorEnsemble(directory, torch.nn.Sequential(torch.nn.Linear(D, 8)))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module.*got function"):
        vr_mcmc.PosteriorEnsemble(directory, mlp)
    with pytest.raises(ValueError, match=r"needs logits \[n, classes\]; the model returned shape \(37,\)"):
        vr_mcmc.PosteriorEnsemble(directory, _OneLogit()).predict(X_TEST)  # softmax over inputs would be silent
    with pytest.raises(ValueError, match="likelihood must be one of"):
        vr_mcmc.PosteriorEnsemble(directory, mlp(), likelihood="poisson")
    with pytest.raises(ValueError, match=r"shuffle=True.*shuffle=False"):
        vr_mcmc.PosteriorEnsemble(directory, mlp()).evaluate(DataLoader(TensorDataset(X_TEST, Y_TEST), shuffle=True))
    assert _tree(directory) == digest  # nothing written, nothing lost


def test_damaged_parameter_files_are_refused_and_left_alone(tmp_path, uninterrupted):
    import shutil

    directory = tmp_path / "run"
    shutil.copytree(uninterrupted[0], directory)
    path = directory / "params" / "chain_1.000005.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    ensemble = vr_mcmc.PosteriorEnsemble(directory, chain_job.model_fn())
    with pytest.raises(vr_mcmc.CheckpointError, match=r"chain_1.000005.safetensors does not match its checksum"):
        ensemble[22]
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(vr_mcmc.CheckpointError, match=r"draw 5 of chain 1 .* has \d+ bytes where \d+ were written"):
        vr_mcmc.PosteriorEnsemble(directory, chain_job.model_fn())
    path.unlink()
    with pytest.raises(vr_mcmc.CheckpointError, match="is missing"):
        vr_mcmc.PosteriorEnsemble(directory, chain_job.model_fn())
