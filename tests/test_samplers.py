"""The stochastic-gradient samplers as torch.optim optimizers: references, state, bad input."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
from torch_sample import priors
from vr_mcmc.data import IndexedDataset, UniformIndexSampler
from vr_mcmc.per_example import PerExampleGradients


def small_problem(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def make_sampler(kind, model, x, y, **kw):
    n = len(x)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)

    def loss_fn(xb, yb):
        return F.cross_entropy(model(xb), yb)

    common = dict(prior=priors.Normal(1.0), generator=torch.Generator().manual_seed(5), **kw)
    if kind == "sgld":
        return torch_sample.SGLD(model.parameters(), lr=1e-3, num_data=n, **common)
    if kind == "saga":
        return torch_sample.SAGALD(model.parameters(), lr=1e-3, num_data=n, engine=PerExampleGradients(model),
                                   **common)
    if kind == "svrg":
        return torch_sample.SVRGLD(model.parameters(), lr=1e-3, num_data=n, snapshot_every=3, loader=loader,
                                   loss_fn=loss_fn, **common)
    return torch_sample.SGLDCV(model.parameters(), lr=1e-3, num_data=n, loader=loader, loss_fn=loss_fn, **common)


def run_steps(sampler, model, x, y, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:6]

        def closure(idx=idx):
            sampler.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        sampler.step(closure, indices=idx)
        draws.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return torch.stack(draws)


@pytest.mark.parametrize("kind", ["sgld", "saga", "svrg", "cv"])
def test_state_dict_resume_gives_identical_draws(kind):
    model, x, y = small_problem()
    sampler = make_sampler(kind, model, x, y, momentum=0.3)
    run_steps(sampler, model, x, y, 4, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "sampler": sampler.state_dict()}, buf)
    expected = run_steps(sampler, model, x, y, 5, seed=2)

    model2, _, _ = small_problem(seed=9)  # different weights until loaded
    sampler2 = make_sampler(kind, model2, x, y, momentum=0.3)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # a checkpoint loads without unpickling arbitrary objects
    model2.load_state_dict(saved["model"])
    sampler2.load_state_dict(saved["sampler"])
    assert sampler2.param_groups[0]["prior"] == priors.Normal(1.0)
    resumed = run_steps(sampler2, model2, x, y, 5, seed=2)
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_zero_temperature_sgld_is_torch_sgd(momentum, nesterov):
    """T = 0: SGLD(lr=h, N) on the mean loss is torch.optim.SGD(lr=h·N) (weight decay = Normal prior)."""
    model, x, y = small_problem()
    model_ref, _, _ = small_problem()
    n, h = len(x), 1e-3
    sampler = torch_sample.SGLD(model.parameters(), lr=h, num_data=n, prior=priors.Normal(2.0), temperature=0,
                                momentum=momentum, nesterov=nesterov)
    sgd = torch.optim.SGD(model_ref.parameters(), lr=h * n, momentum=momentum, nesterov=nesterov,
                          weight_decay=1 / (4.0 * n))
    for k in range(6):
        idx = torch.arange(k, k + 8) % n
        for m, opt in ((model, sampler), (model_ref, sgd)):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_noise_has_the_langevin_scale():
    """With a zero gradient (flat prior, no data term) θ moves by √(2hT)·ξ exactly: a random walk."""
    p = nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    sampler = torch_sample.SGLD([p], lr=0.01, num_data=1, temperature=2.0, generator=torch.Generator().manual_seed(0))
    p.grad = torch.zeros_like(p)
    sampler.step()
    # the variance estimate of 200,000 normals has relative sd sqrt(2/200000) = 0.3%; allow 5 sd
    assert abs(p.detach().var().item() / (2 * 0.01 * 2.0) - 1) < 0.016
    expected = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected * math.sqrt(2 * 0.01 * 2.0))


@pytest.mark.parametrize("prior,dist", [
    (priors.Normal(0.7, mean=0.2), torch.distributions.Normal(0.2, 0.7)),
    (priors.Laplace(1.3, loc=-0.1), torch.distributions.Laplace(-0.1, 1.3)),
])
def test_priors_against_torch_distributions(prior, dist):
    theta = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reference = dist.log_prob(theta).sum()
    (grad,) = torch.autograd.grad(-reference, theta)
    torch.testing.assert_close(prior.log_prob(theta.detach()), reference.detach())
    mine = torch.zeros_like(theta)
    prior.add_grad_(theta.detach(), mine)
    torch.testing.assert_close(mine, grad)
    assert priors.prior_from_dict(prior.to_dict()) == prior


def test_stats_and_lp():
    model, x, y = small_problem()
    n = len(x)
    sampler = torch_sample.SGLD(model.parameters(), lr=1e-4, num_data=n, prior=priors.Normal(1.0))
    idx = torch.arange(6)
    sampler.zero_grad()
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    sampler.step(indices=idx, loss=loss)
    prior_lp = sum(torch.distributions.Normal(0.0, 1.0).log_prob(p).sum() for p in before)
    assert sampler.stats["step_size"] == 1e-4 and sampler.stats["grad_evals"] == 6
    assert sampler.stats["lp"] == pytest.approx(-(n * loss.item()) + prior_lp.item(), rel=1e-12)
    sampler.zero_grad()
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    sampler.step()  # no indices, no loss: what is unknown is said so
    assert math.isnan(sampler.stats["grad_evals"]) and "lp" not in sampler.stats


def test_lr_scheduler_and_param_groups():
    model, x, y = small_problem()
    groups = [dict(params=model[0].parameters(), prior=priors.Laplace(1.0)),
              dict(params=model[2].parameters(), lr=1e-5, temperature=0.0)]
    sampler = torch_sample.SGLD(groups, lr=1e-3, num_data=len(x))
    scheduler = torch.optim.lr_scheduler.StepLR(sampler, step_size=1, gamma=0.5)
    for _ in range(2):
        sampler.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sampler.step()
        scheduler.step()
    assert [g["lr"] for g in sampler.param_groups] == [2.5e-4, 2.5e-6]


def test_parameters_outside_the_engine_get_minibatch_estimates_with_a_warning():
    model, x, y = small_problem()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))  # used in the loss, unknown to the engine
    engine = PerExampleGradients(model)
    sampler = torch_sample.SAGALD([*model.parameters(), extra], lr=1e-3, num_data=len(x), engine=engine,
                                  temperature=0)
    for k in range(2):
        idx = torch.arange(6) + 6 * k
        sampler.zero_grad()
        F.cross_entropy(model(x[idx]) * extra, y[idx]).backward()
        expected = extra.grad * len(x)
        before = extra.detach().clone()
        if k == 0:
            with pytest.warns(UserWarning, match="plain minibatch estimate"):
                sampler.step(indices=idx)
        else:
            sampler.step(indices=idx)  # once only
        torch.testing.assert_close(extra.detach(), before - 1e-3 * expected)


class TestBadInput:
    def test_step_size(self):
        p = nn.Parameter(torch.zeros(2))
        for lr in (0.0, -1e-3, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="lr"):
                torch_sample.SGLD([p], lr=lr, num_data=10)
        with pytest.raises(ValueError, match="lr"):
            torch_sample.SGLD([dict(params=[p], lr=-1.0)], lr=1e-3, num_data=10)

    def test_options(self):
        p = nn.Parameter(torch.zeros(2))
        with pytest.raises(ValueError, match="num_data"):
            torch_sample.SGLD([p], lr=1e-3, num_data=0)
        with pytest.raises(ValueError, match="temperature"):
            torch_sample.SGLD([p], lr=1e-3, num_data=10, temperature=-1)
        with pytest.raises(ValueError, match="momentum"):
            torch_sample.SGLD([p], lr=1e-3, num_data=10, momentum=1.0)
        with pytest.raises(ValueError, match="nesterov"):
            torch_sample.SGLD([p], lr=1e-3, num_data=10, momentum=0.9, nesterov=True)  # T = 1
        with pytest.raises(TypeError, match="prior"):
            torch_sample.SGLD([p], lr=1e-3, num_data=10, prior=1.0)
        with pytest.raises(ValueError, match="std"):
            priors.Normal(0.0)

    def test_batch_larger_than_num_data_and_bad_indices(self):
        model, x, y = small_problem()
        sampler = torch_sample.SGLD(model.parameters(), lr=1e-3, num_data=4)
        F.cross_entropy(model(x[:6]), y[:6]).backward()
        with pytest.raises(ValueError, match="num_data"):
            sampler.step(indices=torch.arange(6))
        with pytest.raises(IndexError, match=r"\[0, 4\)"):
            sampler.step(indices=torch.tensor([0, 4]))
        with pytest.raises(TypeError, match="integer"):
            sampler.step(indices=torch.tensor([0.0, 1.0]))

    def test_saga_needs_indices_engine_and_matching_reduction(self):
        model, x, y = small_problem()
        engine = PerExampleGradients(model)
        sampler = torch_sample.SAGALD(model.parameters(), lr=1e-3, num_data=len(x), engine=engine)
        F.cross_entropy(model(x[:6]), y[:6]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="indices"):
            sampler.step()
        with pytest.raises(ValueError, match="a batch must not hold an example twice"):
            sampler.step(indices=torch.tensor([0, 0, 1, 2, 3, 4]))
        for p, q in zip(model.parameters(), before):  # a refused step changes nothing
            assert torch.equal(p, q)
        with pytest.raises(TypeError, match="PerExampleGradients"):
            torch_sample.SAGALD(model.parameters(), lr=1e-3, num_data=len(x), engine=None)
        with pytest.raises(ValueError, match="loss_reduction"):
            torch_sample.SAGALD(model.parameters(), lr=1e-3, num_data=len(x),
                                engine=PerExampleGradients(model, loss_reduction="sum"))

    def test_sag_is_for_optimization_only(self):
        from vr_mcmc.estimators import SAG

        model, _, _ = small_problem()
        with pytest.raises(ValueError, match="temperature=0"):
            torch_sample.SGLD(model.parameters(), lr=1e-3, num_data=10,
                              estimator=SAG(engine=PerExampleGradients(model)))

    def test_control_variates_need_a_closure_and_the_whole_data(self):
        model, x, y = small_problem()
        sampler = make_sampler("svrg", model, x, y)
        F.cross_entropy(model(x[:6]), y[:6]).backward()
        with pytest.raises(ValueError, match="closure"):
            sampler.step(indices=torch.arange(6))
        partial = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=5, drop_last=True)
        sampler = torch_sample.SVRGLD(model.parameters(), lr=1e-3, num_data=len(x), snapshot_every=2,
                                      loader=partial, loss_fn=lambda xb, yb: F.cross_entropy(model(xb), yb))
        with pytest.raises(ValueError, match="visited 20 examples but num_data=24"):
            sampler.step(lambda: F.cross_entropy(model(x[:6]), y[:6]).backward(), indices=torch.arange(6))
        with pytest.raises(ValueError, match="loader"):
            torch_sample.SVRGLD(model.parameters(), lr=1e-3, num_data=len(x), snapshot_every=2, loader=None,
                                loss_fn=None)
        with pytest.raises(ValueError, match="snapshot_every"):
            torch_sample.SVRGLD(model.parameters(), lr=1e-3, num_data=len(x), snapshot_every=0, loader=partial,
                                loss_fn=F.cross_entropy)


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(x), y


@pytest.mark.parametrize("method", ["saga", "svrg"])
def test_vr_optimizers_reach_sklearn_logistic_regression_optimum(method):
    """T = 0: SAGA and SVRG reach scikit-learn's L2-regularized optimum; SGD at the same step size stalls."""
    from sklearn.linear_model import LogisticRegression

    x_np, y_np = _breast_cancer()
    n, c = len(y_np), 0.1
    clf = LogisticRegression(C=c, tol=1e-14, max_iter=1000, solver="newton-cholesky").fit(x_np, y_np)
    optimum = np.concatenate([clf.coef_.ravel(), clf.intercept_])
    x, y = torch.tensor(x_np), torch.tensor(y_np, dtype=torch.float64)
    lr = 0.3 / n  # 0.3 on the mean loss's scale

    def fit(kind: str, epochs: int) -> float:
        model = nn.Linear(30, 1).double()
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        # sklearn: C·Σ log-loss + ½‖w‖², intercept unpenalized: U = Σ NLL + ‖w‖²/(2C), a Normal(√C) prior on w
        groups = [dict(params=[model.weight], prior=priors.Normal(math.sqrt(c))), dict(params=[model.bias])]
        ds = IndexedDataset(TensorDataset(x, y))
        loader = DataLoader(ds, batch_sampler=UniformIndexSampler(n, 10, seed=0))

        def loss_fn(xb, yb):
            return F.binary_cross_entropy_with_logits(model(xb).squeeze(-1), yb)

        if kind == "saga":
            sampler = torch_sample.SAGALD(groups, lr=lr, num_data=n, engine=PerExampleGradients(model), temperature=0)
        elif kind == "svrg":
            sampler = torch_sample.SVRGLD(groups, lr=lr, num_data=n, snapshot_every=2 * len(loader),
                                          loader=DataLoader(ds, batch_size=n), loss_fn=loss_fn, temperature=0)
        else:
            sampler = torch_sample.SGLD(groups, lr=lr, num_data=n, temperature=0)
        for _ in range(epochs):
            for idx, xb, yb in loader:
                def closure(xb=xb, yb=yb):
                    sampler.zero_grad()
                    loss = loss_fn(xb, yb)
                    loss.backward()
                    return loss

                sampler.step(closure, indices=idx)
        found = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).numpy()
        return float(np.linalg.norm(found - optimum) / np.linalg.norm(optimum))

    err = fit(method, epochs=60)
    assert err <= 1e-6, err
    sgd_err = fit("sgd", epochs=10)
    assert sgd_err > 1e-2, sgd_err  # visibly larger: SGD's noise floor at this step size
