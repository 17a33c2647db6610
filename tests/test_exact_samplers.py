"""ULA, MALA, HMC: acceptance formulas by hand, leapfrog reversibility, safe failure, bad input."""

from __future__ import annotations

import math

import pytest
import refposteriors
import torch

import torch_sample
from torch_sample.hmc import leapfrog

P = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)  # precision of a 2-D Gaussian


def gaussian(theta):
    return torch_sample.log_density_closure(lambda t: -0.5 * t @ P @ t, theta)


SIGMA = torch.tensor([[0.7, 0.3], [0.3, 1.9]], dtype=torch.float64)  # a dense M⁻¹ (positive definite)


@pytest.mark.parametrize("metric", ["diagonal", "dense"])
def test_leapfrog_is_reversible(metric):
    """`leapfrog` is the integrator `HMC.step` runs (in place): 25 steps forward, flip r, 25 back."""
    x0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    r0 = torch.tensor([1.1, 0.4], dtype=torch.float64)
    inv_mass = [torch.tensor([0.7, 1.9], dtype=torch.float64)] if metric == "diagonal" else (lambda v: [SIGMA @ v[0]])

    def grad_fn(x):
        return True, [P @ x[0]]

    x, r = [x0.clone()], [r0.clone()]
    g = [P @ x0]
    for _ in range(25):
        x, r, g, _ = leapfrog(x, r, g, 0.1, inv_mass, grad_fn)
    assert float((x[0] - x0).abs().max()) > 0.1  # it moved
    r = [-m for m in r]
    for _ in range(25):
        x, r, g, _ = leapfrog(x, r, g, 0.1, inv_mass, grad_fn)
    torch.testing.assert_close(x[0], x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(-r[0], r0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("metric", ["diagonal", "dense"])
def test_hmc_step_with_a_metric_matches_the_hand_formula(metric):
    """One HMC step with M⁻¹ = diag(0.5, 3) or the dense SIGMA, by hand: r ~ N(0, M) from the same
    normal draw ξ (r = ξ/√w, or L⁻ᵀξ with M⁻¹ = LLᵀ), three leapfrog steps θ += ε·M⁻¹r, and
    H = U + ½rᵀM⁻¹r; the energy error, the acceptance and the state (new or start) agree to 1e-10."""
    theta = torch.tensor([0.5, -0.4], dtype=torch.float64, requires_grad=True)
    sampler = torch_sample.HMC([theta], lr=0.4, num_leapfrog=3, dense_mass=metric == "dense",
                               generator=torch.Generator().manual_seed(4))
    if metric == "diagonal":
        w = torch.tensor([0.5, 3.0], dtype=torch.float64)
        sampler.state[theta]["inv_mass"] = w.clone()
        inv_mass = torch.diag(w)
    else:
        inv_mass = SIGMA
        sampler.inv_mass_dense = SIGMA.clone()
    chol = torch.linalg.cholesky(inv_mass)
    start = theta.detach().clone()
    xi = torch.randn(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    r0 = torch.linalg.solve_triangular(chol.T, xi[:, None], upper=True)[:, 0]
    sampler.step(gaussian(theta))
    x, r = start.clone(), r0.clone()
    for _ in range(3):
        r = r - 0.2 * (P @ x)
        x = x + 0.4 * (inv_mass @ r)
        r = r - 0.2 * (P @ x)
    h0 = 0.5 * float(start @ P @ start) + 0.5 * float(r0 @ inv_mass @ r0)
    h1 = 0.5 * float(x @ P @ x) + 0.5 * float(r @ inv_mass @ r)
    assert abs(h1 - h0) > 1e-3  # a real test of the energy, not of a zero
    assert sampler.stats["energy_error"] == pytest.approx(h1 - h0, rel=1e-10)
    assert sampler.stats["acceptance_rate"] == pytest.approx(min(1.0, math.exp(h0 - h1)), rel=1e-10)
    assert torch.allclose(theta.detach(), x, rtol=0, atol=1e-10) or torch.equal(theta.detach(), start)


@pytest.mark.parametrize("inv_mass", [None, (0.5, 3.0)])
def test_mala_acceptance_matches_the_hand_formula(inv_mass):
    theta = torch.tensor([0.5, -0.4], dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    sampler = torch_sample.MALA([theta], lr=0.3, generator=gen)
    w = torch.ones(2, dtype=torch.float64) if inv_mass is None else torch.tensor(inv_mass, dtype=torch.float64)
    if inv_mass is not None:  # a preconditioner M⁻¹ = diag(w)
        sampler.state[theta]["inv_mass"] = w.clone()
    start = theta.detach().clone()
    xi = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler.step(gaussian(theta))
    h = 0.3

    def u(t):
        return 0.5 * float(t @ P @ t)

    prop = start - h * w * (P @ start) + math.sqrt(2 * h) * w.sqrt() * xi
    log_q_back = -float(((start - prop + h * w * (P @ prop)) ** 2 / w).sum()) / (4 * h)
    log_q_fwd = -float(((prop - start + h * w * (P @ start)) ** 2 / w).sum()) / (4 * h)
    alpha = min(1.0, math.exp(-(u(prop) - u(start)) + log_q_back - log_q_fwd))
    assert sampler.stats["acceptance_rate"] == pytest.approx(alpha, rel=1e-12)
    assert sampler.stats["energy_error"] == pytest.approx(u(prop) - u(start), rel=1e-12)
    assert torch.allclose(theta.detach(), prop, rtol=0, atol=1e-12) or torch.equal(theta.detach(), start)


@pytest.mark.parametrize("cls", [torch_sample.MALA, torch_sample.HMC], ids=["MALA", "HMC"])
def test_dense_metric_with_a_diagonal_matrix_is_the_diagonal_metric(cls):
    """The dense-mass path (Cholesky solves over the flattened parameters) against the diagonal one
    (checked by hand above), with Σ = diag(w) and the same random numbers; two parameter tensors."""
    w = [torch.tensor([0.5, 3.0], dtype=torch.float64), torch.tensor([1.7], dtype=torch.float64)]
    runs = []
    for dense in (False, True):
        a = torch.tensor([0.5, -0.4], dtype=torch.float64, requires_grad=True)
        b = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
        sampler = cls([a, b], lr=0.3, dense_mass=dense, generator=torch.Generator().manual_seed(5))
        if dense:
            sampler.inv_mass_dense = torch.diag(torch.cat(w))
        else:
            sampler.state[a]["inv_mass"], sampler.state[b]["inv_mass"] = w[0].clone(), w[1].clone()
        closure = torch_sample.log_density_closure(lambda a, b: -0.5 * a @ P @ a - 0.5 * (b * b).sum() / 2.0,
                                                   {"a": a, "b": b})
        stats = []
        for _ in range(20):
            sampler.step(closure)
            stats.append(sampler.stats["acceptance_rate"])
        runs.append((torch.cat([a.detach(), b.detach()]), stats))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-10)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-9)


def test_hmc_acceptance_matches_the_hand_formula():
    theta = torch.tensor([0.5, -0.4], dtype=torch.float64, requires_grad=True)
    sampler = torch_sample.HMC([theta], lr=0.4, num_leapfrog=3, generator=torch.Generator().manual_seed(4))
    start = theta.detach().clone()
    r0 = torch.randn(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sampler.step(gaussian(theta))
    x, r = start.clone(), r0.clone()
    for _ in range(3):  # by hand: unit mass
        r = r - 0.2 * (P @ x)
        x = x + 0.4 * r
        r = r - 0.2 * (P @ x)
    h0 = 0.5 * float(start @ P @ start) + 0.5 * float(r0 @ r0)
    h1 = 0.5 * float(x @ P @ x) + 0.5 * float(r @ r)
    assert sampler.stats["energy_error"] == pytest.approx(h1 - h0, rel=1e-10)
    assert sampler.stats["acceptance_rate"] == pytest.approx(min(1.0, math.exp(h0 - h1)), rel=1e-10)
    assert sampler.stats["n_steps"] == 3 and sampler.stats["grad_evals"] == 3


@pytest.mark.parametrize("cls,kw", [(torch_sample.MALA, dict(lr=0.5)),
                                    (torch_sample.HMC, dict(lr=0.3, num_leapfrog=5))])
def test_gaussian_moments(cls, kw):
    """4,000 draws of a 2-D Gaussian: mean and covariance each within 5 Monte Carlo standard errors.

    The SEs are batch-means SEs (20 batches of 200 draws, far longer than these chains'
    autocorrelation times of a few steps) of the mean and of the second moments x_i·x_j (the true
    mean is 0, so their expectation is the covariance). They come to 2.7-5.1% of the covariance's
    entries (measured, seed 0; the draws' z-scores are below 0.9), so the band is what the run
    resolves, not a fixed 15% + 0.05 (4.6-8.5 SEs, by entry and sampler)."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    sampler = cls([theta], generator=torch.Generator().manual_seed(0), **kw)
    closure = gaussian(theta)
    draws = []
    for _ in range(4200):
        sampler.step(closure)
        draws.append(theta.detach().clone())
    x = torch.stack(draws[200:])
    batch_means = x.reshape(20, -1, 2).mean(1)
    se = batch_means.std(0) / math.sqrt(20)
    assert bool((x.mean(0).abs() <= 5 * se).all())
    moments = (x[:, :, None] * x[:, None, :]).reshape(20, -1, 2, 2).mean(1)  # batch means of x xᵀ
    moment_se = moments.std(0) / math.sqrt(20)
    z = (moments.mean(0) - torch.linalg.inv(P)) / moment_se
    assert float(z.abs().max()) < 5, (z, moment_se)


def test_nan_at_a_proposal_is_a_rejection_marked_diverging():
    theta = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)

    def log_density(t):  # NaN beyond |t| > 1: proposals there must be rejected, not crash
        lp = -0.5 * (t * t).sum()
        return torch.where(t.abs().max() > 1.0, torch.full_like(lp, float("nan")), lp)

    closure = torch_sample.log_density_closure(log_density, theta)
    for cls, kw in ((torch_sample.MALA, {}), (torch_sample.HMC, dict(num_leapfrog=4)), (torch_sample.ULA, {})):
        sampler = cls([theta], lr=2.0, generator=torch.Generator().manual_seed(1), **kw)
        seen = 0
        for _ in range(30):
            before = theta.detach().clone()
            sampler.step(closure)
            if sampler.stats["diverging"]:
                seen += 1
                assert torch.equal(theta.detach(), before)  # restored
                assert torch.allclose(theta.grad, before)  # and the cached gradient: ∇U = θ here
        assert seen > 0 and bool(theta.detach().abs().max() <= 1.0)


def test_adaptation_sets_the_averaged_step_size():
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    sampler = torch_sample.MALA([theta], lr=50.0, generator=torch.Generator().manual_seed(0))
    sampler.adapt(True)
    closure = gaussian(theta)
    for _ in range(400):
        sampler.step(closure)
    sampler.adapt(False)
    assert sampler.step_size == pytest.approx(sampler.dual.final_step_size)
    accept = []
    for _ in range(2000):
        sampler.step(closure)
        accept.append(sampler.stats["acceptance_rate"])
    assert abs(sum(accept) / len(accept) - 0.574) < 0.05


def correlated_gaussian(theta):
    """20-D Gaussian, sds 0.5…2, AR(1) correlation 0.5: a diagonal mass matrix cannot whiten it."""
    sd = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    i = torch.arange(20, dtype=torch.float64)
    precision = torch.linalg.inv(sd[:, None] * 0.5 ** (i[:, None] - i).abs() * sd)
    return torch_sample.log_density_closure(lambda t: -0.5 * t @ precision @ t, theta)


def eight_schools(theta):
    return torch_sample.log_density_closure(refposteriors.POSTERIORS[EIGHT_SCHOOLS].log_density, theta)


EIGHT_SCHOOLS = "eight_schools-eight_schools_noncentered"
TARGETS = [pytest.param(correlated_gaussian, 20, id="gaussian"),
           # 20–35 s per case on the loaded 2-core CPU (skipped in a clone before the data were shipped; the Gaussian
           # target keeps the check in the default selection): `pytest -m slow`
           pytest.param(eight_schools, 10, id="eight_schools",
                        marks=[pytest.mark.slow, pytest.mark.skipif(not refposteriors.available(),
                                                                    reason=refposteriors.unavailable_reason() or "-")])]


@pytest.mark.parametrize("make_closure, dim", TARGETS)
@pytest.mark.parametrize("cls", [torch_sample.MALA, torch_sample.HMC], ids=["MALA", "HMC"])
@pytest.mark.parametrize("start_step", [30.0, 0.003], ids=["100x_too_large", "100x_too_small"])
def test_adaptation_reaches_the_target_acceptance(make_closure, dim, cls, start_step):
    """Must-show 3 of issue 5. After 2000 warmup steps the acceptance measured over the next 2000
    steps (at the final, fixed step size) lies within 0.05 of the target. Seeds 0–2 were all
    measured within 0.03 on both targets (the ±0.01 of a 2000-step acceptance mean plus the error
    of the adapted step); the check of the start asserts it really was ~100× off."""
    theta = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    sampler = cls([theta], lr=start_step, generator=torch.Generator().manual_seed(0))
    closure = make_closure(theta)
    sampler.adapt(True, num_warmup=2000)
    for _ in range(2000):
        sampler.step(closure)
    sampler.adapt(False)
    final = sampler.step_size
    assert max(final / start_step, start_step / final) > 50
    accept = []
    for _ in range(2000):
        sampler.step(closure)
        assert sampler.step_size == final  # adaptation is off
        accept.append(sampler.stats["acceptance_rate"])
    assert abs(sum(accept) / len(accept) - sampler.dual.target) < 0.05, (final, sum(accept) / len(accept))


class TestBadInput:
    def test_options(self):
        theta = torch.zeros(2, requires_grad=True)
        for lr in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="lr"):
                torch_sample.MALA([theta], lr=lr)
        with pytest.raises(ValueError, match="num_leapfrog"):
            torch_sample.HMC([theta], lr=0.1, num_leapfrog=0)

    def test_non_finite_start(self):
        theta = torch.tensor([float("nan"), 0.0], requires_grad=True)
        with pytest.raises(ValueError, match="NaN or inf"):
            torch_sample.HMC([theta], lr=0.1).step(gaussian(theta))
        theta = torch.tensor([0.0, 0.0], requires_grad=True)
        closure = torch_sample.log_density_closure(lambda t: -(t.sum() - t.sum()) / 0.0, theta)
        with pytest.raises(ValueError, match="not finite"):
            torch_sample.MALA([theta], lr=0.1).step(closure)

    def test_bad_closures(self):
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        sampler = torch_sample.MALA([theta], lr=0.1)
        with pytest.raises(TypeError, match="one-element tensor"):
            sampler.step(lambda: (theta * theta).sum(0).expand(2))
        with pytest.raises(RuntimeError, match="backward"):
            sampler.step(lambda: (theta * theta).sum().detach())


def test_compiled_closure_gives_the_eager_loss_and_gradient():
    """log_density_closure(compile=True) (torch.compile of torch.func.grad_and_value) against eager
    autograd, for a flat tensor and a dict; the compiled one adds to .grad as backward would."""
    def log_density(t):
        return -0.5 * t @ P @ t + torch.log1p(t.square()).sum()

    for as_dict in (False, True):
        values = []
        for compile in (False, True):
            theta = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
            params = {"t": theta} if as_dict else theta
            closure = torch_sample.log_density_closure(log_density, params, compile=compile)
            loss = closure()
            values.append((loss.detach().clone(), theta.grad.clone()))
            closure()  # a second call accumulates, as U.backward() would
            torch.testing.assert_close(theta.grad, 2 * values[-1][1])
        torch.testing.assert_close(values[0][0], values[1][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(values[0][1], values[1][1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dense", [False, True])
def test_metric_algebra_against_the_explicit_matrix(dense):
    """`Metric` on two parameters of different shapes, against Σ = M⁻¹ written out: M⁻¹v = Σv,
    vᵀM⁻¹v, vᵀMv = vᵀΣ⁻¹v, and its draws from given ξ: a = Lξ with aᵀΣ⁻¹a = ξᵀξ (N(0, M⁻¹)) and
    r with rᵀΣr = ξᵀξ (N(0, M))."""
    from torch_sample.metric import Metric

    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    state = {id(p): {} for p in params}
    xi = iter([torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params] * 2)
    metric = Metric(lambda p: state[id(p)], lambda: params, lambda p: next(xi), dense=dense)
    if dense:
        a = torch.randn(7, 7, generator=g, dtype=torch.float64)
        sigma = a @ a.T + 0.5 * torch.eye(7, dtype=torch.float64)
        metric.inv_mass_dense = sigma.clone()
    else:
        w = torch.rand(7, generator=g, dtype=torch.float64) + 0.2
        metric.set_from_variance(w)
        sigma = torch.diag(w)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    flat = torch.cat([t.reshape(-1) for t in v])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in metric.times_inv_mass(v)]), sigma @ flat)
    assert metric.quad_inv_mass(v) == pytest.approx(float(flat @ sigma @ flat), rel=1e-12)
    assert metric.quad_mass(v) == pytest.approx(float(flat @ torch.linalg.solve(sigma, flat)), rel=1e-10)
    torch.testing.assert_close(metric.diagonal_flat(), sigma.diagonal())
    noise = [torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) for p in params]
    norm = float(sum((n * n).sum() for n in noise))
    xi = iter(noise * 2)
    a = torch.cat([t.reshape(-1) for t in metric.sample_inv_mass(params)])
    r = torch.cat([t.reshape(-1) for t in metric.sample_mass(params)])
    assert float(a @ torch.linalg.solve(sigma, a)) == pytest.approx(norm, rel=1e-10)
    assert float(r @ sigma @ r) == pytest.approx(norm, rel=1e-10)


def test_ula_is_a_closure_sampler_without_metropolis_machinery():
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ula = torch_sample.ULA([theta], lr=0.1)
    assert isinstance(ula, torch_sample.ClosureSampler) and torch_sample.MetropolisSampler not in type(ula).__mro__
    assert not ula.adapts_step_size and not hasattr(ula, "dual") and not hasattr(ula, "max_energy_error")
    with pytest.raises(ValueError, match="no acceptance rate"):
        ula.adapt(True)
