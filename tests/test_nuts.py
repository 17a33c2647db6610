"""NUTS: the tree building by hand and against an independent NumPy implementation, a long run on a correlated
Gaussian, divergences on the centred eight schools funnel (also through `vr_mcmc.sample` and `vr-mcmc summary`),
bad input, a resumed state dict, and a run through `vr_mcmc.sample`."""

from __future__ import annotations

import math

import chain_job
import numpy as np
import pytest
import torch

import torch_sample
import vr_mcmc

az = pytest.importorskip("arviz")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(theta: torch.Tensor, precision: torch.Tensor | None = None):
    if precision is None:
        return torch_sample.log_density_closure(lambda t: -0.5 * (t * t).sum(), theta)
    return torch_sample.log_density_closure(lambda t: -0.5 * t @ precision @ t, theta)


def fixed_momentum(sampler: torch_sample.NUTS, momentum: list[float]) -> None:
    sampler.metric.sample_mass = lambda like: [torch.tensor(momentum, dtype=torch.float64)]


# -- 1. the selected point's distribution over a hand-checked trajectory -----------------------------------


def test_selection_distribution_on_a_forward_trajectory():
    """1-D standard Gaussian, θ0 = 0.3, r = 1, ε = 0.1, always forward, max_tree_depth = 3: the trajectory is the
    8 leapfrog states x0..x7 (no U-turn before t ≈ 1.28). The new state is drawn by biased progressive sampling
    at the top (subtrees {1}, {2, 3}, {4..7}, each taken over the old trajectory with probability
    min(1, w_new/w_old)) and multinomially within a subtree (w_i = exp(H0 − H_i)); the frequencies of 3,000
    transitions from the same state must match those probabilities (χ² test)."""
    eps, x0, r0 = 0.1, 0.3, 1.0
    xs, rs = [x0], [r0]
    x, r = x0, r0
    for _ in range(7):  # leapfrog of U = x²/2
        r -= 0.5 * eps * x
        x += eps * r
        r -= 0.5 * eps * x
        xs.append(x)
        rs.append(r)
    xs, rs = np.array(xs), np.array(rs)
    h = 0.5 * xs**2 + 0.5 * rs**2
    w = np.exp(h[0] - h)

    def within(lo: int, hi: int) -> np.ndarray:  # multinomial draw from the subtree [lo, hi): recursive halves
        p = np.zeros(8)
        if hi - lo == 1:
            p[lo] = 1
            return p
        mid = (lo + hi) // 2
        second = w[mid:hi].sum() / w[lo:hi].sum()
        return (1 - second) * within(lo, mid) + second * within(mid, hi)

    probs = np.zeros(8)
    probs[0] = 1
    for lo, hi in ((1, 2), (2, 4), (4, 8)):
        take = min(1.0, w[lo:hi].sum() / w[:lo].sum())
        probs = (1 - take) * probs + take * within(lo, hi)

    theta = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
    sampler = torch_sample.NUTS([theta], lr=eps, max_tree_depth=3, generator=torch.Generator().manual_seed(0))
    fixed_momentum(sampler, [r0])
    sampler._forward = lambda: True
    closure = gaussian(theta)
    n = 3000
    counts = np.zeros(8)
    for _ in range(n):
        with torch.no_grad():
            theta.fill_(x0)
        sampler.step(closure)
        i = int(np.argmin(np.abs(xs - theta.item())))
        assert abs(xs[i] - theta.item()) < 1e-12
        counts[i] += 1
    stats = sampler.stats
    assert (stats["tree_depth"], stats["n_steps"], stats["reached_max_tree_depth"]) == (3, 7, 1)
    assert stats["acceptance_rate"] == pytest.approx(np.minimum(1, w[1:]).mean(), abs=1e-12)
    assert stats["energy"] == pytest.approx(h[i], abs=1e-12)
    expected = n * probs
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, (counts, expected)  # the 0.999 quantile of χ² with 7 degrees of freedom


# -- 2. one transition against an independent NumPy implementation, same random numbers -------------------


def numpy_nuts(theta, r, grad_u, u_fn, eps, inv_mass, uniforms, max_depth, max_energy_error=1000.0):
    """Stan's multinomial NUTS written out on NumPy arrays (diagonal M⁻¹), drawing from the list ``uniforms``.
    Returns (θ of the new state, tree depth, leapfrog steps, acceptance statistic, diverging)."""
    draws = iter(uniforms)
    h0 = u_fn(theta) + 0.5 * (inv_mass * r * r).sum()
    count = {"n": 0, "accept": 0.0, "divergent": False}

    def step(q, p, g, e):
        p = p - 0.5 * e * g
        q = q + e * inv_mass * p
        g = grad_u(q)
        p = p - 0.5 * e * g
        return q, p, g

    def turning(sharp_a, sharp_b, rho):
        return not (sharp_a @ rho > 0 and sharp_b @ rho > 0)

    def tree(q, p, g, e, depth):
        """-> (state at the far end, dict of the subtree) or (state, None) when invalid."""
        if depth == 0:
            q, p, g = step(q, p, g, e)
            count["n"] += 1
            h = u_fn(q) + 0.5 * (inv_mass * p * p).sum()
            count["accept"] += min(1.0, math.exp(h0 - h))
            if h - h0 > max_energy_error:
                count["divergent"] = True
                return (q, p, g), None
            return (q, p, g), dict(lw=h0 - h, pick=q, beg=p, end=p, rho=p)
        state, a = tree(q, p, g, e, depth - 1)
        if a is None:
            return state, None
        state, b = tree(*state, e, depth - 1)
        if b is None:
            return state, None
        lw = np.logaddexp(a["lw"], b["lw"])
        pick = b["pick"] if next(draws) < math.exp(b["lw"] - lw) else a["pick"]
        rho = a["rho"] + b["rho"]
        if (turning(inv_mass * a["beg"], inv_mass * b["end"], rho)
                or turning(inv_mass * a["beg"], inv_mass * b["beg"], a["rho"] + b["beg"])
                or turning(inv_mass * a["end"], inv_mass * b["end"], b["rho"] + a["end"])):
            return state, None
        return state, dict(lw=lw, pick=pick, beg=a["beg"], end=b["end"], rho=rho)

    g0 = grad_u(theta)
    fwd = bck = (theta, r, g0)
    whole = dict(lw=0.0, pick=theta, beg=r, end=r, rho=r)  # beg: the backward end, end: the forward end
    depth = 0
    while depth < max_depth:
        forward = next(draws) > 0.5
        if forward:
            fwd, sub = tree(*fwd, eps, depth)
        else:
            bck, sub = tree(*bck, -eps, depth)
        if sub is None:
            break
        depth += 1
        take = sub["lw"] > whole["lw"] or next(draws) < math.exp(sub["lw"] - whole["lw"])  # no draw when certain
        pick = sub["pick"] if take else whole["pick"]
        if forward:
            a, b = whole, sub
        else:
            a = dict(sub, beg=sub["end"], end=sub["beg"])
            b = whole
        rho = a["rho"] + b["rho"]
        stop = (turning(inv_mass * a["beg"], inv_mass * b["end"], rho)
                or turning(inv_mass * a["beg"], inv_mass * b["beg"], a["rho"] + b["beg"])
                or turning(inv_mass * a["end"], inv_mass * b["end"], b["rho"] + a["end"]))
        whole = dict(lw=np.logaddexp(whole["lw"], sub["lw"]), pick=pick, beg=a["beg"], end=b["end"], rho=rho)
        if stop:
            break
    return whole["pick"], depth, count["n"], count["accept"] / count["n"], count["divergent"]


@pytest.mark.parametrize("seed", range(12))
def test_transition_matches_numpy_implementation(seed):
    """A correlated 2-D Gaussian (ρ = 0.95, sds 1 and 3), M⁻¹ = diag(0.7, 5): one NUTS transition from a random
    state and momentum, fed the same uniforms, gives the NumPy implementation's new state, tree depth, number of
    leapfrog steps and acceptance statistic (over 12 seeds both U-turns and the depth limit end trajectories)."""
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.95 * 3], [0.95 * 3, 9.0]])
    precision = np.linalg.inv(cov)
    inv_mass = np.array([0.7, 5.0])
    theta0 = rng.normal(size=2) * np.array([1.0, 3.0])
    r0 = rng.normal(size=2) / np.sqrt(inv_mass)
    uniforms = list(rng.uniform(size=200))
    eps = float(rng.uniform(0.1, 0.5))
    max_depth = 2 if seed % 3 == 0 else 10

    def u_fn(q):
        return 0.5 * q @ precision @ q

    expected = numpy_nuts(theta0, r0, lambda q: precision @ q, u_fn, eps, inv_mass, uniforms, max_depth)

    theta = torch.tensor(theta0, requires_grad=True)
    sampler = torch_sample.NUTS([theta], lr=eps, max_tree_depth=max_depth)
    sampler.metric.diagonal()[0].copy_(torch.from_numpy(inv_mass))
    fixed_momentum(sampler, list(r0))
    feed = iter(uniforms)
    sampler._uniform = lambda: next(feed)
    sampler.step(gaussian(theta, torch.from_numpy(precision)))
    np.testing.assert_allclose(theta.detach().numpy(), expected[0], rtol=1e-10, atol=1e-12)
    stats = sampler.stats
    assert (stats["tree_depth"], stats["n_steps"]) == (expected[1], expected[2])
    assert stats["acceptance_rate"] == pytest.approx(expected[3], rel=1e-10)
    assert stats["diverging"] == float(expected[4])
    assert stats["reached_max_tree_depth"] == float(expected[1] == max_depth)
    np.testing.assert_allclose(theta.grad.numpy(), precision @ expected[0], rtol=1e-10, atol=1e-12)


# -- 3. a long run on a correlated Gaussian --------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True], ids=["diag", "dense"])
def test_long_run_on_correlated_gaussian(dense):
    """2-D Gaussian with correlation 0.9 and sds 1, 3: after an adapted warmup, the means, variances and the
    covariance of 3,000 draws are within 4.5 Monte Carlo standard errors (ArviZ's, autocorrelation included) of
    the truth, and the acceptance statistic is near the 0.8 target."""
    cov = torch.tensor([[1.0, 2.7], [2.7, 9.0]], dtype=torch.float64)
    theta = torch.tensor([3.0, -5.0], dtype=torch.float64, requires_grad=True)
    sampler = torch_sample.NUTS([theta], lr=0.5, dense_mass=dense, generator=torch.Generator().manual_seed(11))
    closure = gaussian(theta, torch.linalg.inv(cov))
    sampler.adapt(True, num_warmup=500)
    for _ in range(500):
        sampler.step(closure)
    sampler.adapt(False)
    draws, accept = [], []
    for _ in range(3000):
        sampler.step(closure)
        draws.append(theta.detach().numpy().copy())
        accept.append(sampler.stats["acceptance_rate"])
        assert sampler.stats["diverging"] == 0
    x = np.array(draws)
    functions = {"x1": (x[:, 0], 0.0), "x2": (x[:, 1], 0.0), "x1²": (x[:, 0] ** 2, 1.0), "x2²": (x[:, 1] ** 2, 9.0),
                 "x1·x2": (x[:, 0] * x[:, 1], 2.7)}
    for name, (values, truth) in functions.items():
        mcse = float(az.mcse(values[None, :]))
        assert abs(values.mean() - truth) < 4.5 * mcse, (name, values.mean(), truth, mcse)
    assert 0.7 < np.mean(accept) < 0.95


# -- 4. divergences on a funnel ---------------------------------------------------------------------------

Y_SCHOOLS = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA_SCHOOLS = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)


def centred_eight_schools(z: torch.Tensor) -> torch.Tensor:
    """log p(μ, log τ, θ | y) of the centred eight schools: μ ~ N(0, 5), τ ~ half-Cauchy(5), θ_j ~ N(μ, τ)."""
    mu, log_tau, theta = z[0], z[1], z[2:]
    tau = log_tau.exp()
    lp = -0.5 * (mu / 5) ** 2 - torch.log1p((tau / 5) ** 2) + log_tau
    lp = lp - 8 * log_tau - 0.5 * (((theta - mu) / tau) ** 2).sum()
    return lp - 0.5 * (((Y_SCHOOLS - theta) / SIGMA_SCHOOLS) ** 2).sum()


def test_divergences_on_centred_eight_schools():
    """The centred eight schools' funnel: NUTS never crashes, reports divergences in ``diverging`` (Stan has
    them here at the default 0.8 target), and its stats stay well formed."""
    z = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    sampler = torch_sample.NUTS([z], lr=0.2, generator=torch.Generator().manual_seed(3))
    closure = torch_sample.log_density_closure(centred_eight_schools, z)
    sampler.adapt(True, num_warmup=150)
    for _ in range(150):
        sampler.step(closure)
    sampler.adapt(False)
    diverging = 0
    for _ in range(200):
        sampler.step(closure)
        stats = sampler.stats
        diverging += stats["diverging"]
        assert stats["diverging"] in (0.0, 1.0)
        assert 0 <= stats["acceptance_rate"] <= 1 and 1 <= stats["n_steps"] <= 2**10 - 1
        assert math.isfinite(stats["lp"]) and bool(torch.isfinite(z).all())
    assert diverging > 0


# -- 5. bad input ----------------------------------------------------------------------------------------


def test_bad_input():
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_tree_depth"):
            torch_sample.NUTS([theta], lr=0.1, max_tree_depth=bad)
    with pytest.raises(ValueError, match="target_accept"):
        torch_sample.NUTS([theta], lr=0.1, target_accept=1.0)
    with pytest.raises(ValueError, match="closure"):
        torch_sample.NUTS([theta], lr=0.1).step(None)

    sampler = torch_sample.NUTS([theta], lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        sampler.step(lambda: (theta**2).sum().detach())
    with torch.no_grad():
        theta.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        sampler.step(gaussian(theta))
    with torch.no_grad():
        theta.fill_(1.0)
    log_at_start = torch_sample.log_density_closure(lambda t: torch.log(t - 1).sum(), theta)
    with pytest.raises(ValueError, match="not finite"):
        sampler.step(log_at_start)


def test_domain_error_and_nonfinite_during_trajectory_are_divergences():
    """A closure that raises a domain error (ValueError) or returns a non-finite U beyond θ = 1 makes the
    trajectory diverge there: the state stays inside, ``diverging`` is 1, ``.grad`` is ∇U at the new state; any
    other exception propagates with the start state restored."""
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def raising(t):
        if t.item() > 1:
            raise ValueError("outside the support")
        return -0.5 * (t * t).sum()

    for log_density in (raising, lambda t: torch.where(t > 1, -torch.inf, -0.5 * t * t).sum()):
        with torch.no_grad():
            theta.zero_()
        sampler = torch_sample.NUTS([theta], lr=0.4, generator=torch.Generator().manual_seed(0))
        closure = torch_sample.log_density_closure(log_density, theta)
        seen = 0.0
        for _ in range(50):
            sampler.step(closure)
            seen += sampler.stats["diverging"]
            assert theta.item() <= 1
            assert theta.grad.item() == pytest.approx(theta.item())
        assert seen > 0

    calls = {"n": 0}

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("boom")
        return -0.5 * (t * t).sum()

    with torch.no_grad():
        theta.fill_(0.2)
    sampler = torch_sample.NUTS([theta], lr=0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(KeyError):
        sampler.step(torch_sample.log_density_closure(failing, theta))
    assert theta.item() == 0.2 and theta.grad.item() == pytest.approx(0.2)


# -- 6. through vr_mcmc.sample ---------------------------------------------------------------------------


def nuts(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.NUTS(model.parameters(), lr=0.1, num_data=chain_job.N, prior=torch_sample.priors.Normal(2.0))


def test_nuts_through_sample():
    """NUTS is a closure sampler that adapts its step size: `vr_mcmc.sample` runs 2 chains of it on the logistic
    regression (two parameter tensors and a prior), adapts, records its stats, and agrees with HMC's means."""
    idata = vr_mcmc.sample(chain_job.model_fn, nuts, chain_job.loss_fn, (chain_job.X, chain_job.Y), batch_size=20,
                           num_chains=2, num_warmup=200, num_samples=200, seed=3, progress=False)
    stats = idata.sample_stats
    for name in ("tree_depth", "n_steps", "reached_max_tree_depth", "diverging", "energy", "acceptance_rate"):
        assert name in stats, name
    assert float(stats["diverging"].sum()) == 0
    assert 0.6 < float(stats["acceptance_rate"].mean()) < 0.97
    step_sizes = stats["step_size"].values
    assert (step_sizes == step_sizes[:, :1]).all() and (step_sizes[:, 0] != 0.1).all()  # adapted, then fixed
    np.testing.assert_allclose(stats["data_passes"].values, np.cumsum(stats["n_steps"].values, axis=1)
                               + stats["data_passes"].values[:, :1] - stats["n_steps"].values[:, :1])
    hmc = chain_job.run(None, "hmc", num_samples=300, num_warmup=100)
    for name in idata.posterior.data_vars:
        ours, theirs = idata.posterior[name].values, hmc.posterior[name].values
        np.testing.assert_allclose(ours.mean(axis=(0, 1)), theirs.mean(axis=(0, 1)), atol=0.25)


def test_state_dict_resumes_the_same_chain():
    """A NUTS sampler saved mid-warmup and loaded into a fresh one (new parameters, same options) continues with
    exactly the draws of the uninterrupted chain: step size, dual averaging, Welford windows, metric, generator."""
    def make(theta):
        return torch_sample.NUTS([theta], lr=0.3, generator=torch.Generator().manual_seed(5))

    cov = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    a = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    sampler = make(a)
    closure = gaussian(a, torch.linalg.inv(cov))
    sampler.adapt(True, num_warmup=150)
    for _ in range(60):
        sampler.step(closure)
    state = sampler.state_dict()
    saved = a.detach().clone()
    reference = []
    for _ in range(30):
        sampler.step(closure)
        reference.append(a.detach().clone())

    b = saved.clone().requires_grad_(True)
    resumed = make(b)
    resumed.load_state_dict(state)
    closure_b = gaussian(b, torch.linalg.inv(cov))
    for expected in reference:
        resumed.step(closure_b)
        torch.testing.assert_close(b.detach(), expected, rtol=0, atol=0)
    assert resumed.step_size == sampler.step_size


class EightSchools(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.z = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))


def test_funnel_divergences_through_sample_and_summary(tmp_path, capsys):
    """The centred eight schools through `vr_mcmc.sample` (2 chains): the run completes, ``diverging`` is in
    ``sample_stats`` with some divergences, and `vr-mcmc summary` reports them."""
    from vr_mcmc import cli

    idata = vr_mcmc.sample(EightSchools, lambda m: torch_sample.NUTS(m.parameters(), lr=0.2, max_tree_depth=6),
                           lambda m, batch: -centred_eight_schools(m.z), torch.zeros(1, 1), batch_size=1,
                           num_chains=2, num_warmup=100, num_samples=150, seed=1, progress=False)
    diverging = idata.sample_stats["diverging"].values
    assert diverging.dtype == bool and diverging.sum() > 0
    assert (idata.sample_stats["tree_depth"].values <= 6).all()
    path = tmp_path / "funnel.nc"
    idata.to_netcdf(str(path))
    capsys.readouterr()
    assert cli.main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"divergences: {int(diverging.sum())} of {diverging.size} draws" in out
