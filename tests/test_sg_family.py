"""The stochastic-gradient family (issue 17, DESIGN.md §11): SGHMC, PSGLD, SGNHT × every estimator × schedules.

Correctness against exact laws. Tolerances: Monte Carlo error is measured, not guessed: C independent chains
run side by side (the target is a product over chains), so a moment's standard error is the spread of its
per-chain estimates over √C; each moment must lie within 4 standard errors plus the discretization bias,
bounded by c·h_eff·λ_max·max|Σ| (an O(h) bound: for Euler–Maruyama on a Gaussian with precision A the
stationary covariance is A⁻¹(I − hA/2)⁻¹, relative bias hλ/2; the underdamped schemes are O(h) too).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
import vr_mcmc
from torch_sample import priors
from torch_sample.schedules import Cyclical
from vr_mcmc.data import IndexedDataset
from vr_mcmc.estimators import SAGA, SVRG, ControlVariate, Minibatch
from vr_mcmc.per_example import PerExampleGradients

SIGMA = torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=torch.float64)  # correlated 2-D Gaussian target

DIFFUSIONS = {  # name -> (constructor, h): exact-gradient runs on SIGMA (λ_max(A) = 2.5)
    "sgld": (lambda p, h, g, **kw: torch_sample.SGLD(p, lr=h, num_data=1, generator=g, **kw), 0.02),
    "sghmc": (lambda p, h, g, **kw: torch_sample.SGHMC(p, lr=h, num_data=1, friction=1.5, generator=g, **kw), 0.05),
    "psgld": (lambda p, h, g, **kw: torch_sample.PSGLD(p, lr=h, num_data=1, generator=g, **kw), 0.02),
    "sgnht": (lambda p, h, g, **kw: torch_sample.SGNHT(p, lr=h, num_data=1, friction=1.5, generator=g, **kw), 0.05),
}


def gaussian_run(name: str, chains: int, steps: int, burn: int) -> tuple[torch.Tensor, float]:
    """Draws (steps, chains, 2) of diffusion ``name`` with exact gradients, and its effective step h_eff."""
    make, h = DIFFUSIONS[name]
    precision = torch.linalg.inv(SIGMA)
    start = torch.randn(chains, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = start.requires_grad_()  # not at the mode: pSGLD's first V = ∇Ũ² would be 0 there
    sampler = make([theta], h, torch.Generator().manual_seed(3))
    draws = torch.empty(steps, chains, 2, dtype=torch.float64)
    for k in range(burn + steps):
        if name == "psgld" and k == burn // 2:
            sampler.freeze_preconditioner()  # adapted during the first half of the burn-in; exact after
        sampler.zero_grad()
        u = 0.5 * ((theta @ precision) * theta).sum()
        u.backward()
        sampler.step(loss=u)
        if k >= burn:
            draws[k - burn] = theta.detach()
    h_eff = h
    if name == "psgld":
        h_eff = h * float(sampler.state[theta]["square_avg"].sqrt().add(1e-5).reciprocal().max())
    return draws, h_eff


def check_moments(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, h_eff: float, lam: float) -> None:
    chain_means = draws.mean(0)  # (C, d)
    centred = draws - chain_means
    chain_covs = torch.einsum("tci,tcj->cij", centred, centred) / (draws.shape[0] - 1)
    c = draws.shape[1]
    bias = h_eff * lam * float(cov.abs().max())
    se_mean = chain_means.std(0) / math.sqrt(c)
    se_cov = chain_covs.std(0) / math.sqrt(c)
    assert ((chain_means.mean(0) - mean).abs() <= 4 * se_mean + bias).all(), (chain_means.mean(0), mean, se_mean)
    assert ((chain_covs.mean(0) - cov).abs() <= 4 * se_cov + bias).all(), (chain_covs.mean(0), cov, se_cov, bias)


@pytest.mark.parametrize("name", list(DIFFUSIONS))
def test_exact_gradient_draws_match_the_gaussian(name):
    draws, h_eff = gaussian_run(name, chains=100, steps=1500, burn=400)
    check_moments(draws, torch.zeros(2, dtype=torch.float64), SIGMA, h_eff, lam=2.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIFFUSIONS))
def test_exact_gradient_draws_match_the_gaussian_long(name):
    draws, h_eff = gaussian_run(name, chains=400, steps=8000, burn=1000)
    check_moments(draws, torch.zeros(2, dtype=torch.float64), SIGMA, h_eff, lam=2.5)


# -- conjugate Bayesian linear regression, every diffusion × estimator --------------------------------------

N, D, NOISE = 64, 2, 0.5


def blr_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + NOISE * torch.randn(N, generator=g, dtype=torch.float64)
    cov = torch.linalg.inv(x.T @ x / NOISE**2 + torch.eye(D, dtype=torch.float64))  # prior N(0, I)
    return x, y, cov @ x.T @ y / NOISE**2, cov


def blr_loss(model, xb, yb):
    return ((model(xb).squeeze(-1) - yb) ** 2).mean() / (2 * NOISE**2)


BLR_STEPS = {"sgld": 2e-4, "psgld": 1e-2, "sghmc": 1e-2, "sgnht": 1e-2}


def blr_sampler(diffusion, estimator_name, model, x, y, chains_seed=0):
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32)

    def loss_fn(xb, yb):
        return blr_loss(model, xb, yb)

    estimator = {"minibatch": lambda: Minibatch(),
                 "saga": lambda: SAGA(engine=PerExampleGradients(model)),
                 "svrg": lambda: SVRG(10, loader=loader, loss_fn=loss_fn),
                 "cv": lambda: ControlVariate(loader=loader, loss_fn=loss_fn)}[estimator_name]()
    common = dict(num_data=N, prior=priors.Normal(1.0), estimator=estimator,
                  generator=torch.Generator().manual_seed(chains_seed))
    h = BLR_STEPS[diffusion]
    if diffusion == "sgld":
        return torch_sample.SGLD(model.parameters(), lr=h, **common)
    if diffusion == "psgld":
        return torch_sample.PSGLD(model.parameters(), lr=h, **common)
    if diffusion == "sghmc":
        return torch_sample.SGHMC(model.parameters(), lr=h, friction=20.0, **common)
    return torch_sample.SGNHT(model.parameters(), lr=h, friction=20.0, **common)


def blr_run(diffusion, estimator_name, steps, burn, seed=0):
    x, y, mean, cov = blr_problem()
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        # one sd off the posterior mean: at the mode a variance-reduced ∇Ũ is ~0 and pSGLD's first V with it
        model.weight.copy_((mean + cov.diagonal().sqrt() * torch.tensor([1.0, -1.0], dtype=mean.dtype)).reshape(1, D))
    sampler = blr_sampler(diffusion, estimator_name, model, x, y, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    draws = []
    for k in range(burn + steps):
        if diffusion == "psgld" and k == burn // 2:
            sampler.freeze_preconditioner()
        idx = torch.randperm(N, generator=gen)[:16]

        def closure(idx=idx):
            sampler.zero_grad()
            loss = blr_loss(model, x[idx], y[idx])
            loss.backward()
            return loss

        sampler.step(closure, indices=idx)
        if k >= burn:
            draws.append(model.weight.detach().reshape(-1).clone())
    return torch.stack(draws), mean, cov, sampler


ESTIMATORS = ["minibatch", "saga", "svrg", "cv"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("diffusion", list(BLR_STEPS))
def test_every_diffusion_with_every_estimator_on_linear_regression(diffusion, estimator):
    """Short: the mean within 0.5 posterior sd, the variances within a factor 1.6 (600 correlated draws; the
    minibatch noise adds an O(h) excess of variance). The slow test below is the tight version."""
    draws, mean, cov, sampler = blr_run(diffusion, estimator, steps=600, burn=200)
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() <= 0.5 * sd).all(), (draws.mean(0), mean, sd)
    ratio = draws.var(0) / cov.diagonal()
    assert ((ratio > 1 / 1.6) & (ratio < 1.6)).all(), ratio
    assert math.isfinite(sampler.stats["lp"]) and not sampler.stats["diverging"]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("diffusion", list(BLR_STEPS))
def test_every_diffusion_with_every_estimator_on_linear_regression_long(diffusion, estimator):
    """8 independent chains of 4000 draws: mean within 4 standard errors (chain spread) + 0.1 sd, variance
    within 25% (the O(h) bias from the step and the gradient noise at these step sizes is under 15%)."""
    runs = [blr_run(diffusion, estimator, steps=4000, burn=500, seed=s) for s in range(8)]
    mean, cov = runs[0][1], runs[0][2]
    means = torch.stack([r[0].mean(0) for r in runs])
    variances = torch.stack([r[0].var(0) for r in runs])
    sd = cov.diagonal().sqrt()
    assert ((means.mean(0) - mean).abs() <= 4 * means.std(0) / math.sqrt(8) + 0.1 * sd).all()
    assert ((variances.mean(0) / cov.diagonal() - 1).abs() < 0.25).all(), variances.mean(0) / cov.diagonal()


# -- own stats, noise_ratio, β estimate ----------------------------------------------------------------------

def test_each_diffusion_reports_its_own_stats_and_noise_ratio():
    x, y, _, _ = blr_problem()
    for diffusion, keys in {"sghmc": ["kinetic_energy"], "sgnht": ["kinetic_energy", "thermostat"],
                            "psgld": ["preconditioner"]}.items():
        model = nn.Linear(D, 1, bias=False).double()
        sampler = blr_sampler(diffusion, "minibatch", model, x, y)
        sampler.estimator.engine = PerExampleGradients(model)
        idx = torch.arange(16)
        sampler.zero_grad()
        loss = blr_loss(model, x[idx], y[idx])
        loss.backward()
        sampler.step(indices=idx, loss=loss)
        for key in [*keys, "noise_ratio", "lp", "step_size", "diverging"]:
            assert key in sampler.stats, (diffusion, key)
        assert math.isfinite(sampler.stats["noise_ratio"]) and sampler.stats["noise_ratio"] > 0


def test_sghmc_beta_auto_lowers_the_injected_noise():
    x, y, _, _ = blr_problem()
    model = nn.Linear(D, 1, bias=False).double()
    sampler = torch_sample.SGHMC(model.parameters(), lr=1e-2, num_data=N, friction=20.0, beta="auto",
                                 engine=PerExampleGradients(model))
    idx = torch.arange(16)
    for _ in range(2):
        sampler.zero_grad()
        loss = blr_loss(model, x[idx], y[idx])
        loss.backward()
        sampler.step(indices=idx, loss=loss)
    beta = sampler._beta(sampler.param_groups[0], model.weight)
    assert beta > 0
    with pytest.raises(ValueError, match="engine="):
        torch_sample.SGHMC(nn.Linear(2, 1).parameters(), lr=1e-2, num_data=N, beta="auto")


def test_sgld_momentum_path_still_works():
    model = nn.Linear(D, 1, bias=False).double()
    x, y, _, _ = blr_problem()
    sampler = torch_sample.SGLD(model.parameters(), lr=1e-4, num_data=N, momentum=0.9)
    sampler.zero_grad()
    blr_loss(model, x, y).backward()
    sampler.step()
    assert "momentum_buffer" in sampler.state[model.weight]


# -- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda p: torch_sample.SGHMC(p, lr=1e-2, num_data=4, friction=0.0), "friction"),
    (lambda p: torch_sample.SGHMC(p, lr=1e-2, num_data=4, friction=-1.0), "friction"),
    (lambda p: torch_sample.SGHMC(p, lr=0.5, num_data=4, friction=10.0), "lr·friction"),
    (lambda p: torch_sample.SGHMC(p, lr=0.1, num_data=4, friction=1.0, beta=100.0), "beta"),
    (lambda p: torch_sample.SGHMC(p, lr=0.1, num_data=4, friction=1.0, beta=-1.0), "beta"),
    (lambda p: torch_sample.SGNHT(p, lr=1e-2, num_data=4, friction=0.0), "friction"),
    (lambda p: torch_sample.PSGLD(p, lr=1e-2, num_data=4, alpha=1.0), "alpha"),
    (lambda p: torch_sample.PSGLD(p, lr=1e-2, num_data=4, alpha=-0.1), "alpha"),
    (lambda p: torch_sample.PSGLD(p, lr=1e-2, num_data=4, eps=0.0), "eps"),
    (lambda p: torch_sample.PSGLD(p, lr=1e-2, num_data=4, eps=float("nan")), "eps"),
    (lambda p: Cyclical(0, 100), "num_cycles"),
    (lambda p: Cyclical(4, 100, exploration=1.0), "exploration"),
    (lambda p: Cyclical(4, 100, exploration=-0.1), "exploration"),
    (lambda p: Cyclical(4, 2), "total_steps"),
])
def test_bad_options_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make(nn.Linear(2, 1).parameters())


@pytest.mark.parametrize("cls", [torch_sample.SGHMC, torch_sample.PSGLD, torch_sample.SGNHT])
def test_estimator_needing_indices_without_them_names_the_fix(cls):
    model = nn.Linear(D, 1, bias=False).double()
    x, y, _, _ = blr_problem()
    sampler = cls(model.parameters(), lr=1e-3, num_data=N, estimator=SAGA(engine=PerExampleGradients(model)))
    sampler.zero_grad()
    blr_loss(model, x[:8], y[:8]).backward()
    with pytest.raises(ValueError, match=r"step\(indices=idx\)"):
        sampler.step()


def test_schedule_run_past_its_end_is_an_error():
    theta = torch.zeros(2, requires_grad=True)
    sampler = torch_sample.SGLD([theta], lr=0.1, num_data=1, schedule=Cyclical(1, 3))
    for k in range(4):
        sampler.zero_grad()
        (theta**2).sum().backward()
        if k < 3:
            sampler.step()
        else:
            with pytest.raises(ValueError, match="total_steps=3"):
                sampler.step()


def test_cyclical_schedule_shape():
    s = Cyclical(num_cycles=2, total_steps=10, exploration=0.6)
    factors = [s(k) for k in range(10)]
    assert factors[0] == (1.0, 0.0, False) and factors[5] == (1.0, 0.0, False)
    assert [f[2] for f in factors[:5]] == [False, False, False, True, True]
    assert all(factors[k][0] > factors[k + 1][0] for k in range(4))


# -- through vr_mcmc.sample: checkpoint/resume, sampling-phase draws ------------------------------------------

X_S = torch.randn(48, 3, generator=torch.Generator().manual_seed(0))
Y_S = X_S @ torch.tensor([0.5, -1.0, 0.2]) + 0.3 * torch.randn(48, generator=torch.Generator().manual_seed(1))
FAIL = {"at": None, "calls": 0}


def model_fn():
    return nn.Linear(3, 1)


def loss_fn(model, batch):
    FAIL["calls"] += 1
    if FAIL["at"] is not None and FAIL["calls"] == FAIL["at"]:
        raise RuntimeError("killed for the test")
    xb, yb = batch[0], batch[1]
    return F.mse_loss(model(xb).squeeze(-1), yb)


def sampler_for(kind, total=None):
    def make(model):
        common = dict(num_data=48, prior=priors.Normal(1.0), generator=torch.Generator().manual_seed(7))
        schedule = None if total is None else Cyclical(2, total)
        if kind == "sghmc":
            return torch_sample.SGHMC(model.parameters(), lr=1e-2, friction=10.0, schedule=schedule,
                                      estimator=SAGA(engine=PerExampleGradients(model)), **common)
        if kind == "psgld":
            return torch_sample.PSGLD(model.parameters(), lr=1e-3, schedule=schedule, **common)
        if kind == "sgnht":
            return torch_sample.SGNHT(model.parameters(), lr=1e-2, friction=10.0, schedule=schedule, **common)
        return torch_sample.SGLD(model.parameters(), lr=1e-3, schedule=schedule, **common)
    return make


def run_sample(kind, directory=None, total=None, num_samples=40):
    return vr_mcmc.sample(model_fn, sampler_for(kind, total), loss_fn, (X_S, Y_S), batch_size=8, num_warmup=10,
                          num_samples=num_samples, num_chains=1, record=["weight"], checkpoint=directory,
                          checkpoint_every=5, progress=False, seed=3)


@pytest.mark.parametrize("kind", ["sghmc", "psgld", "sgnht"])
def test_checkpoint_resume_gives_the_uninterrupted_draws(kind, tmp_path):
    FAIL.update(at=None, calls=0)
    uninterrupted = run_sample(kind)
    FAIL.update(at=37, calls=0)
    with pytest.raises(RuntimeError, match="killed for the test"):
        run_sample(kind, tmp_path / "run")
    FAIL.update(at=None, calls=0)
    resumed = run_sample(kind, tmp_path / "run")
    a = uninterrupted.posterior["weight"].values
    b = resumed.posterior["weight"].values
    assert a.shape == b.shape and (a == b).all()
    for key in ("kinetic_energy", "thermostat", "preconditioner"):
        if key in uninterrupted.sample_stats:
            assert (uninterrupted.sample_stats[key].values == resumed.sample_stats[key].values).all()


def test_sample_keeps_only_sampling_phase_draws():
    FAIL.update(at=None, calls=0)
    idata = run_sample("sgld", total=50)
    phase = idata.sample_stats["sampling_phase"].values
    assert (phase == 1).all()
    # cycles of 25 steps, 5 sampling steps each (r >= 0.8), the first cycle's in warmup (steps 1..10) has none
    assert idata.posterior["weight"].shape[1] == 10
    with pytest.raises(ValueError, match="total_steps=50"):
        run_sample("sgld", total=60)
    with pytest.raises(ValueError, match="total_steps=50"):
        run_sample("sgld", total=40)
