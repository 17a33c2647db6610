"""Silent mistakes a user makes with SAGA-LD (issue 16.10): a forgotten zero_grad() and a summed loss."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_sample
from vr_mcmc.per_example import PerExampleGradients

N, B = 200, 20


def _setup(seed: int = 0, loss_reduction: str = "mean"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(N, 8), torch.randint(0, 3, (N,))
    sampler = torch_sample.SAGALD(model.parameters(), lr=1e-4, num_data=N, loss_reduction=loss_reduction,
                                  engine=PerExampleGradients(model, loss_reduction=loss_reduction),
                                  prior=torch_sample.priors.Normal(1.0))
    return model, x, y, sampler


def _steps(model, x, y, sampler, n, zero=True, reduction="mean"):
    for step in range(n):
        idx = torch.randperm(N)[:B]
        if zero:
            sampler.zero_grad(set_to_none=step % 2 == 0)  # both kinds of zeroing
        loss = F.cross_entropy(model(x[idx]), y[idx], reduction=reduction)
        loss.backward()
        sampler.step(indices=idx, loss=loss)


def test_forgotten_zero_grad_is_refused_by_name():
    """Without zero_grad() the second step sees .grad = last estimate + new gradient: refused, naming zero_grad();
    the first step (nothing to accumulate onto) goes through."""
    model, x, y, sampler = _setup()
    _steps(model, x, y, sampler, 1, zero=False)
    with pytest.raises(ValueError, match=r"zero_grad\(\)"):
        _steps(model, x, y, sampler, 1, zero=False)


def test_zeroed_grads_pass_the_check_for_many_steps():
    """No false alarm over 300 steps with either zeroing, and none with a model that uses a layer twice (its
    gradient is the sum of two contributions, added in the same order by the hook and by .grad)."""
    model, x, y, sampler = _setup()
    _steps(model, x, y, sampler, 300)
    lin = torch.nn.Linear(6, 6)
    twice = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    sampler = torch_sample.SAGALD(twice.parameters(), lr=1e-4, num_data=N, engine=PerExampleGradients(twice))
    data = torch.randn(N, 6)
    for _ in range(50):
        idx = torch.randperm(N)[:B]
        sampler.zero_grad()
        twice(data[idx]).square().sum(1).mean().backward()
        sampler.step(indices=idx)


def test_changed_grad_is_refused():
    model, x, y, sampler = _setup()
    idx = torch.arange(B)
    sampler.zero_grad()
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(ValueError, match="clipping"):
        sampler.step(indices=idx)


def test_summed_loss_warns_once():
    """reduction='sum' (or a final .sum()) where the sampler expects the mean: one warning naming the fix; none
    for the mean, none when the sampler is told loss_reduction='sum'."""
    model, x, y, sampler = _setup()
    with pytest.warns(UserWarning, match="loss_reduction='sum'") as caught:
        _steps(model, x, y, sampler, 3, reduction="sum")
    assert sum("looks like a sum" in str(w.message) for w in caught) == 1
    model, x, y, sampler = _setup()
    with pytest.warns(UserWarning, match="SumBackward0"):
        idx = torch.arange(B)
        sampler.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx], reduction="none").sum()
        loss.backward()
        sampler.step(indices=idx, loss=loss)
    for reduction, told in (("mean", "mean"), ("sum", "sum")):
        model, x, y, sampler = _setup(loss_reduction=told)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _steps(model, x, y, sampler, 3, reduction=reduction)
