"""``noise_ratio`` (the gradient-noise diagnostic of every SG sampler) against a Monte Carlo estimate.

At a fixed θ (restored after every step, and the SAGA table and SVRG snapshot kept fixed), the
estimate v a sampler uses is drawn for M random batches: h·tr Cov_MC(v)/(2TP) is the Monte Carlo
noise ratio, and the mean of the sampler's per-step ``noise_ratio`` (each from one batch's
per-example gradients) must match it. A third, exact value comes from a float64 loop over all N
single-example gradients. Tolerance 10%: with M = 2000 batches the Monte Carlo trace has a relative
sd below sqrt(2/M) = 3.2%, and the mean of the per-batch estimates (unbiased for the exact value)
about 1-2%, so 10% is over 3 sd of their difference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_sample
from vr_mcmc.per_example import PerExampleGradients

N, B, D, K = 200, 40, 5, 3  # B/N large enough that the finite-population factor (0.8) matters
H, TEMP = 1e-3, 1.0
M = 2000


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(D, K)
    return model, x, y


def per_example_grads(model, x, y) -> torch.Tensor:
    """[N, P] float64 gradients of each example's loss, one backward each (the independent reference)."""
    m64 = nn.Linear(D, K).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    rows = []
    for i in range(N):
        m64.zero_grad()
        F.cross_entropy(m64(x[i:i + 1].double()), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in m64.parameters()]))
    return torch.stack(rows)


def exact_ratio(diffs: torch.Tensor) -> float:
    """h·Var(v)/(2TP) with Var = N²/B·(1−B/N)·tr Cov(d) (population covariance with N−1)."""
    var = N**2 / B * (1 - B / N) * diffs.var(0, unbiased=True).sum().item()
    return H * var / (2 * TEMP * diffs.shape[1])


def run_fixed(model, x, y, sampler, fixed_state=None, closure_too=False):
    """(mean noise_ratio, MC noise ratio) over M batches at the model's current θ."""
    theta = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    vs, ratios = [], []
    for _ in range(M):
        idx = torch.randperm(N, generator=gen)[:B]

        def closure(idx=idx):
            sampler.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        if closure_too:
            sampler.step(closure, indices=idx)
        else:
            closure()
            sampler.step(indices=idx)
        vs.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]))
        ratios.append(sampler.stats["noise_ratio"])
        with torch.no_grad():
            for p, t in zip(model.parameters(), theta):
                p.copy_(t)
        if fixed_state is not None:
            fixed_state()
    v = torch.stack(vs)
    mc = H * v.var(0).sum().item() / (2 * TEMP * v.shape[1])
    return sum(ratios) / len(ratios), mc


def test_sgld_noise_ratio_matches_monte_carlo_and_exact():
    model, x, y = problem()
    sampler = torch_sample.SGLD(model.parameters(), lr=H, num_data=N, engine=PerExampleGradients(model))
    exact = exact_ratio(per_example_grads(model, x, y))
    mean, mc = run_fixed(model, x, y, sampler)
    assert mc == pytest.approx(exact, rel=0.10)
    assert mean == pytest.approx(mc, rel=0.10)
    assert mean == pytest.approx(exact, rel=0.05)


def test_saga_noise_ratio_uses_the_stored_rows():
    model, x, y = problem()
    engine = PerExampleGradients(model)
    sampler = torch_sample.SAGALD(model.parameters(), lr=H, num_data=N, engine=engine)
    # fill the table at another θ', then evaluate at θ: d_i = g_i(θ) − g_i(θ')
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g_other = per_example_grads(model, x, y)
    sampler.initialize([(torch.arange(s, s + 50), x[s:s + 50], y[s:s + 50]) for s in range(0, N, 50)],
                       lambda xb, yb: F.cross_entropy(model(xb), yb))
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.3 * torch.randn_like(p))
    exact = exact_ratio(per_example_grads(model, x, y) - g_other)
    table_state = sampler.estimator.table.state_dict()
    mean, mc = run_fixed(model, x, y, sampler, lambda: sampler.estimator.table.load_state_dict(table_state))
    assert mc == pytest.approx(exact, rel=0.10)
    assert mean == pytest.approx(mc, rel=0.10)
    # SAGA's noise is that of g_i − h_i, not of g_i: smaller here than SGLD's
    assert exact < 0.5 * exact_ratio(per_example_grads(model, x, y))


def test_svrg_noise_ratio_uses_the_snapshot():
    model, x, y = problem()
    loader = [(torch.arange(s, s + 50), x[s:s + 50], y[s:s + 50]) for s in range(0, N, 50)]
    sampler = torch_sample.SVRGLD(model.parameters(), lr=H, num_data=N, snapshot_every=10**9, loader=loader,
                                  loss_fn=lambda xb, yb: F.cross_entropy(model(xb), yb),
                                  engine=PerExampleGradients(model))
    g_centre = per_example_grads(model, x, y)
    idx = torch.arange(B)

    def closure():
        sampler.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        return loss

    sampler.step(closure, indices=idx)  # the snapshot θ̃: here, no noise at all
    assert sampler.stats["noise_ratio"] == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    exact = exact_ratio(per_example_grads(model, x, y) - g_centre)
    mean, mc = run_fixed(model, x, y, sampler, closure_too=True)
    assert mc == pytest.approx(exact, rel=0.10)
    assert mean == pytest.approx(mc, rel=0.10)


def test_noise_ratio_is_nan_without_an_engine_or_with_one_example_and_inf_at_zero_temperature():
    model, x, y = problem()
    plain = torch_sample.SGLD(model.parameters(), lr=H, num_data=N)
    F.cross_entropy(model(x[:B]), y[:B]).backward()
    plain.step(indices=torch.arange(B))
    assert math.isnan(plain.stats["noise_ratio"])

    model, x, y = problem()
    sampler = torch_sample.SGLD(model.parameters(), lr=H, num_data=N, engine=PerExampleGradients(model))
    F.cross_entropy(model(x[:1]), y[:1]).backward()
    sampler.step(indices=torch.arange(1))  # a batch of one: no spread to estimate, and no failure
    assert math.isnan(sampler.stats["noise_ratio"])

    model, x, y = problem()
    cold = torch_sample.SGLD(model.parameters(), lr=H, num_data=N, temperature=0.0, engine=PerExampleGradients(model))
    F.cross_entropy(model(x[:B]), y[:B]).backward()
    cold.step(indices=torch.arange(B))
    assert cold.stats["noise_ratio"] == math.inf


def test_noise_ratio_scales_with_the_step_temperature_and_momentum():
    """h·Var/(2(1−μ)TP): the same batch at a 3× step, T/2 and μ = 0.5 gives 3·2·2 = 12× the ratio."""
    ratios = []
    for lr, temp, mom in ((H, 1.0, 0.0), (3 * H, 0.5, 0.5)):
        model, x, y = problem()
        s = torch_sample.SGLD(model.parameters(), lr=lr, num_data=N, temperature=temp, momentum=mom,
                              engine=PerExampleGradients(model))
        F.cross_entropy(model(x[:B]), y[:B]).backward()
        s.step(indices=torch.arange(B))
        ratios.append(s.stats["noise_ratio"])
    assert ratios[1] == pytest.approx(12 * ratios[0], rel=1e-6)
