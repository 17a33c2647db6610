"""Fault injection (issue 14): each test reproduces a fault with the real thing (a SIGKILL, a damaged
file, a full file system, a bad input) and checks that it is detected, explained, and loses no draw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chain_job
import numpy as np
import pytest
import torch

import torch_sample
import vr_mcmc

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 10. seeds -------------------------------------------------------------------------------------


def test_runs_with_neighbouring_seeds_share_no_chain():
    """With seed + chain, seed=4 chain 0 was seed=3 chain 1, bit for bit."""
    a = chain_job.run(None, "sgld", num_samples=10, num_warmup=0, seed=3)
    b = chain_job.run(None, "sgld", num_samples=10, num_warmup=0, seed=4)
    for c in range(1, 2):
        assert not np.array_equal(a.posterior["weight"].values[c], b.posterior["weight"].values[c - 1])
    assert not np.array_equal(a.posterior["weight"].values[0], a.posterior["weight"].values[1])
    seeds = {vr_mcmc.chains.chain_seeds(s, c) for s in range(20) for c in range(8)}
    assert len(seeds) == 160


# -- 1. SG samplers: non-finite steps are skipped, counted, and stop the chain with a clear error --------


def _linear_problem(nan_row: int | None = None):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=gen), torch.randn(64, generator=gen)
    if nan_row is not None:
        x[nan_row, 1] = float("nan")
    return x, y


def test_sgld_skips_a_nan_batch_and_names_the_data_after_k_in_a_row():
    x, y = _linear_problem(nan_row=5)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    sampler = torch_sample.SGLD(model.parameters(), lr=1e-3, num_data=64, max_divergences=3)
    seen = {"diverging": 0, "moved": 0}
    for start in range(0, 64, 8):  # 8 batches, one of them holds the NaN example
        idx = torch.arange(start, start + 8)
        before = [p.detach().clone() for p in model.parameters()]
        sampler.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])
        loss.backward()
        sampler.step(indices=idx, loss=loss.detach())
        same = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert sampler.stats["diverging"] == (start == 0) == same  # the step was undone exactly there
        seen["diverging" if same else "moved"] += 1
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert seen == {"diverging": 1, "moved": 7}
    idx = torch.arange(0, 8)
    with pytest.raises(torch_sample.DivergenceError, match=r"3 steps in a row.*non-finite data.*step size too large"):
        for _ in range(3):
            sampler.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx])
            loss.backward()
            sampler.step(indices=idx, loss=loss.detach())


def test_exploding_step_size_is_stopped_with_the_growth_of_the_gradient():
    x, y = _linear_problem()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    sampler = torch_sample.SGLD(model.parameters(), lr=5.0, num_data=64, temperature=0.0)
    with pytest.raises(torch_sample.DivergenceError, match=r"20 steps in a row.*norm went from .* to .*lr=5"):
        for _ in range(2000):
            sampler.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
            loss.backward()
            sampler.step(loss=loss.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the last finite state


class _FailAt:
    """A loss_fn that turns bad at its ``at``-th call (NaN, or an exception): U = NaN, or a crash mid-run."""

    def __init__(self, at: int, fault: str):
        self.calls, self.at, self.fault = 0, at, fault

    def __call__(self, model, batch):
        self.calls += 1
        loss = chain_job.loss_fn(model, batch)
        if self.calls >= self.at:
            if self.fault == "raise":
                raise ValueError("injected fault")
            return loss * float("nan")
        return loss


def _sgld_k5(model):
    sampler = chain_job.sgld(model)
    sampler.max_divergences = 5
    return sampler


def test_sample_stops_a_diverging_chain_and_keeps_every_draw_before_it():
    options = dict(batch_size=20, num_chains=2, num_warmup=10, num_samples=60, seed=3, progress=False,
                   checkpoint_every=7)
    clean = vr_mcmc.sample(chain_job.model_fn, _sgld_k5, chain_job.loss_fn, (chain_job.X, chain_job.Y), **options)
    with pytest.raises(torch_sample.DivergenceError, match="5 steps in a row") as info:
        vr_mcmc.sample(chain_job.model_fn, _sgld_k5, _FailAt(41, "nan"), (chain_job.X, chain_job.Y), **options)
    partial = info.value.partial
    # steps 41..44 diverged (kept, flagged), step 45 raised: draws 1..34 after the 10 warmup steps
    assert list(partial.posterior.chain.values) == [0] and partial.posterior.sizes["draw"] == 34
    diverging = partial.sample_stats["diverging"].values[0]
    assert not diverging[:30].any() and diverging[30:].all()
    np.testing.assert_array_equal(partial.posterior["weight"].values[0, :30], clean.posterior["weight"].values[0, :30])
    np.testing.assert_array_equal(partial.posterior["weight"].values[0, 30:],  # frozen at the last finite draw
                                  np.repeat(partial.posterior["weight"].values[0, 29:30], 4, axis=0))
    assert info.value.checkpoint is None


# -- 3. a run without checkpoint= that raises keeps its draws --------------------------------------


def test_an_exception_mid_run_carries_the_draws_made_before_it():
    options = dict(batch_size=20, num_chains=2, num_warmup=10, num_samples=40, seed=3, progress=False,
                   checkpoint_every=15)
    clean = vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, chain_job.loss_fn, (chain_job.X, chain_job.Y),
                           **options)
    with pytest.raises(ValueError, match="injected fault") as info:  # chain 1, its 23rd step
        vr_mcmc.sample(chain_job.model_fn, chain_job.sgld, _FailAt(50 + 23, "raise"), (chain_job.X, chain_job.Y),
                       **options)
    partial = info.value.partial
    weight = partial.posterior["weight"].values
    assert weight.shape[:2] == (2, 40)
    np.testing.assert_array_equal(weight[0], clean.posterior["weight"].values[0])
    np.testing.assert_array_equal(weight[1, :12], clean.posterior["weight"].values[1, :12])
    assert np.isnan(weight[1, 12:]).all()  # chain 1 is shorter: padded, not cut, not invented
