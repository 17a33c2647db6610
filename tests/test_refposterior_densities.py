"""Checks of the reference-posterior log densities in ``refposteriors.py``, independent of any sampler.

* autograd gradient = central finite differences;
* log π(θ(params)) minus an independent numpy/scipy.stats re-implementation (in the same θ coordinates, Jacobian
  written in terms of the constrained parameters) is constant over reference draws;
* the Stein identities E[∇log π] = 0, E[∇log π (θ-m)ᵀ] = -I hold on the reference draws (whitened coordinates);
* the reference mean beats points 3 sd away; for the regressions the mode is within 0.5 sd of the reference mean;
* batched evaluation = per-point evaluation; to_params and from_params are inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import refposteriors
import torch
from refposteriors import POSTERIORS, RefPosterior, available, unavailable_reason
from scipy import stats

needs_data = pytest.mark.skipif(not available(), reason=unavailable_reason() or "reference posteriors missing")

NAMES = list(POSTERIORS)
REGRESSIONS = ["sblri-blr", "sblrc-blr", "nes1992-nes", "earnings-logearn_interaction_z"]


def _raw_data(name: str) -> dict:
    return refposteriors.load_json(name, "data")


def _grad_log_density(post: RefPosterior, theta: torch.Tensor) -> torch.Tensor:
    """∇log π at each row of θ [M, dim], by autograd on the batched density."""
    theta = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(post.log_density(theta).sum(), theta)[0]


def _flat_reference(post: RefPosterior, step: int = 1) -> dict[str, np.ndarray]:
    """Reference draws, chains concatenated, every ``step``-th draw: {name: [M]}."""
    return {k: v.reshape(-1)[::step] for k, v in post.reference().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Independent numpy / scipy.stats log densities in θ coordinates, from the constrained parameters (arrays [M]).


def _np_regression(p: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, prior_scale: float | None) -> np.ndarray:
    """Σ_n log N(y_n | x_nᵀβ, σ) [+ Σ log N(β_d|0,c) + log halfN(σ|c)] + log σ (Jacobian of σ = e^s)."""
    beta = np.stack([p[f"beta[{d}]"] for d in range(1, X.shape[1] + 1)], -1)  # [M, D]
    sigma = p["sigma"]
    lp = stats.norm.logpdf(y[None, :], beta @ X.T, sigma[:, None]).sum(-1) + np.log(sigma)
    if prior_scale is not None:
        lp += stats.norm.logpdf(beta, 0.0, prior_scale).sum(-1) + stats.halfnorm.logpdf(sigma, scale=prior_scale)
    return lp


def _np_sblr(name: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """sblri / sblrc: X and y as given, N(0, 10) priors on beta and sigma."""

    def log_density(p: dict[str, np.ndarray]) -> np.ndarray:
        raw = _raw_data(name)
        return _np_regression(p, np.asarray(raw["X"], dtype=float), np.asarray(raw["y"], dtype=float), 10.0)

    return log_density


def _np_nes(p: dict[str, np.ndarray]) -> np.ndarray:
    raw = _raw_data("nes1992-nes")
    age = np.asarray(raw["age_discrete"])
    cols = [np.ones(len(age)), raw["real_ideo"], raw["race_adj"], age == 2, age == 3, age == 4]
    X = np.column_stack([*cols, raw["educ1"], raw["gender"], raw["income"]]).astype(float)
    return _np_regression(p, X, np.asarray(raw["partyid7"], dtype=float), None)


def _np_earnings(p: dict[str, np.ndarray]) -> np.ndarray:
    raw = _raw_data("earnings-logearn_interaction_z")
    height, male = np.asarray(raw["height"], dtype=float), np.asarray(raw["male"], dtype=float)
    z = (height - height.mean()) / np.std(height, ddof=1)
    X = np.column_stack([np.ones_like(z), z, male, z * male])
    return _np_regression(p, X, np.log(np.asarray(raw["earn"], dtype=float)), None)


def _np_gauss_mix(p: dict[str, np.ndarray]) -> np.ndarray:
    """Priors N(0,2), halfN(2), Beta(5,5); mixture likelihood; log|J| = log(mu2-mu1) + log σ1 + log σ2 + log w(1-w)."""
    y = np.asarray(_raw_data("low_dim_gauss_mix-low_dim_gauss_mix")["y"], dtype=float)
    mu1, mu2, s1, s2, w = p["mu[1]"], p["mu[2]"], p["sigma[1]"], p["sigma[2]"], p["theta"]
    prior = (
        stats.norm.logpdf(mu1, 0, 2)
        + stats.norm.logpdf(mu2, 0, 2)
        + stats.halfnorm.logpdf(s1, scale=2)
        + stats.halfnorm.logpdf(s2, scale=2)
        + stats.beta.logpdf(w, 5, 5)
    )
    l1 = np.log(w)[:, None] + stats.norm.logpdf(y[None, :], mu1[:, None], s1[:, None])
    l2 = np.log1p(-w)[:, None] + stats.norm.logpdf(y[None, :], mu2[:, None], s2[:, None])
    log_jac = np.log(mu2 - mu1) + np.log(s1) + np.log(s2) + np.log(w) + np.log1p(-w)
    return prior + np.logaddexp(l1, l2).sum(-1) + log_jac


def _np_eight_schools(p: dict[str, np.ndarray]) -> np.ndarray:
    """Density of (theta_trans, mu, tau) with theta_trans = (theta - mu)/tau; likelihood y_j ~ N(theta_j, sigma_j)."""
    raw = _raw_data("eight_schools-eight_schools_noncentered")
    theta = np.stack([p[f"theta[{j}]"] for j in range(1, 9)], -1)
    mu, tau = p["mu"], p["tau"]
    z = (theta - mu[:, None]) / tau[:, None]
    prior = stats.norm.logpdf(z).sum(-1) + stats.norm.logpdf(mu, 0, 5) + stats.halfcauchy.logpdf(tau, scale=5)
    lik = stats.norm.logpdf(np.asarray(raw["y"], dtype=float), theta, np.asarray(raw["sigma"], dtype=float)).sum(-1)
    return prior + lik + np.log(tau)


def _np_garch(p: dict[str, np.ndarray]) -> np.ndarray:
    """Plain loop over the variance recursion; |J| = alpha0·alpha1·beta1·(1-alpha1-beta1) for our transform."""
    raw = _raw_data("garch-garch11")
    y = np.asarray(raw["y"], dtype=float)
    mu, a0, a1, b1 = p["mu"], p["alpha0"], p["alpha1"], p["beta1"]
    v = np.empty((len(mu), len(y)))
    v[:, 0] = raw["sigma1"] ** 2
    for t in range(1, len(y)):
        v[:, t] = a0 + a1 * (y[t - 1] - mu) ** 2 + b1 * v[:, t - 1]
    lik = stats.norm.logpdf(y[None, :], mu[:, None], np.sqrt(v)).sum(-1)
    return lik + np.log(a0) + np.log(a1) + np.log(b1) + np.log(1 - a1 - b1)


NUMPY_DENSITIES: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "sblri-blr": _np_sblr("sblri-blr"),
    "sblrc-blr": _np_sblr("sblrc-blr"),
    "nes1992-nes": _np_nes,
    "earnings-logearn_interaction_z": _np_earnings,
    "low_dim_gauss_mix-low_dim_gauss_mix": _np_gauss_mix,
    "eight_schools-eight_schools_noncentered": _np_eight_schools,
    "garch-garch11": _np_garch,
}


# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: the arrays here are small, and on a busy 2-core machine torch's thread pool turns 1 ms ops
    into 8 ms ones (waiting for the second core). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_import_without_data_folder(monkeypatch, tmp_path):
    """A missing folder makes available() False with a reason naming the env var; nothing raises."""
    monkeypatch.setattr(refposteriors, "REFPOSTERIOR_DIR", tmp_path / "nowhere")
    assert not refposteriors.available()
    assert "VR_MCMC_REFPOSTERIORS" in refposteriors.unavailable_reason()
    assert set(NUMPY_DENSITIES) == set(POSTERIORS) and len(POSTERIORS) == 7


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_reference_and_param_names(name):
    post = POSTERIORS[name]
    ref = post.reference()
    assert tuple(ref) == post.param_names
    assert all(v.shape == (10, 1000) for v in ref.values())
    theta = post.reference_unconstrained()
    assert theta.shape == (10, 1000, post.dim) and theta.dtype == torch.float64 and torch.isfinite(theta).all()
    back = post.to_params(theta)
    assert tuple(back) == post.param_names
    for k in post.param_names:  # from_params is the inverse of to_params
        np.testing.assert_allclose(back[k].numpy(), ref[k], rtol=1e-12, atol=1e-12)


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name):
    """Central differences along each axis, step h·sd_i (sd of the reference draws in θ); compare sd_i·∂_i log π."""
    post = POSTERIORS[name]
    sd = post.reference_unconstrained().reshape(-1, post.dim).std(0)
    points = post.initial_point(torch.Generator().manual_seed(1), shape=(3,), scale=1.5)
    h = 1e-4
    for theta in points:
        theta = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(post.log_density(theta), theta)
        steps = torch.diag(h * sd)
        with torch.no_grad():
            fd = (post.log_density(theta + steps) - post.log_density(theta - steps)) / (2 * h)
        torch.testing.assert_close(fd, grad * sd, rtol=1e-6, atol=1e-6)


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_log_density_equals_scipy_reimplementation_up_to_constant(name):
    """log π(from_params(draw)) - numpy_log_π(draw) is the same constant for 200 reference draws."""
    post = POSTERIORS[name]
    draws = _flat_reference(post, step=50)
    theta = post.from_params(draws)
    assert theta.shape == (200, post.dim)
    ours = post.log_density(theta).numpy()
    theirs = NUMPY_DENSITIES[name](draws)
    diff = ours - theirs
    assert np.all(np.isfinite(diff))
    assert np.ptp(diff) < 1e-9 * (1.0 + np.abs(ours).max()), (np.ptp(diff), diff[:5])


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_stein_identities_on_reference_draws(name):
    """With η = A⁻¹(θ - m), A = chol Cov(θ): E[∇_η log π] ≈ 0 and E[∇_η log π ηᵀ] ≈ -I over the 10,000 draws."""
    post = POSTERIORS[name]
    theta = post.reference_unconstrained().reshape(-1, post.dim)
    grad = torch.cat([_grad_log_density(post, chunk) for chunk in theta.split(250)])  # small chunks: cache friendly
    m = theta.mean(0)
    A = torch.linalg.cholesky(torch.cov((theta - m).T))
    eta = torch.linalg.solve_triangular(A, (theta - m).T, upper=False).T
    g_eta = grad @ A  # ∇_η = Aᵀ ∇_θ, as rows
    stein = g_eta.T @ eta / len(eta)
    assert g_eta.mean(0).abs().max() < 0.08, g_eta.mean(0)
    assert (stein + torch.eye(post.dim)).abs().max() < 0.08, stein


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_reference_mean_beats_points_three_sd_away(name):
    """θ̄ = from_params(reference means) has a higher log π than θ̄ ± 3·sd_i·e_i for every axis i."""
    post = POSTERIORS[name]
    center = post.from_params({k: v.mean() for k, v in post.reference().items()})
    sd = post.reference_unconstrained().reshape(-1, post.dim).std(0)
    shifts = torch.cat([torch.diag(3 * sd), torch.diag(-3 * sd)])
    assert (post.log_density(center + shifts) < post.log_density(center)).all()


@needs_data
@pytest.mark.parametrize("name", REGRESSIONS)
def test_regression_mode_near_reference_mean(name):
    """LBFGS on -log π in the scaled coordinates θ = m + sd·η; to_params(mode) within 0.5 sd of the reference mean."""
    post = POSTERIORS[name]
    ref_theta = post.reference_unconstrained().reshape(-1, post.dim)
    m, sd = ref_theta.mean(0), ref_theta.std(0)
    eta = (
        2.0 * torch.randn(post.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ).requires_grad_()
    opt = torch.optim.LBFGS([eta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -post.log_density(m + sd * eta)
        loss.backward()
        return loss

    opt.step(closure)
    mode = post.to_params((m + sd * eta).detach())
    for k, draws in post.reference().items():
        assert abs(float(mode[k]) - draws.mean()) < 0.5 * draws.std(), (k, float(mode[k]), draws.mean(), draws.std())


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_per_point(name):
    post = POSTERIORS[name]
    theta = post.initial_point(torch.Generator().manual_seed(2), shape=(2, 3), scale=2.0).requires_grad_(True)
    lp = post.log_density(theta)
    assert lp.shape == (2, 3)
    (grad,) = torch.autograd.grad(lp.sum(), theta)
    for i in range(2):
        for j in range(3):
            point = theta[i, j].detach().clone().requires_grad_(True)
            lp_ij = post.log_density(point)
            assert lp_ij.shape == ()
            (g_ij,) = torch.autograd.grad(lp_ij, point)
            torch.testing.assert_close(lp[i, j], lp_ij, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(grad[i, j], g_ij, rtol=1e-10, atol=1e-8)
    params = post.to_params(theta.detach())
    assert all(v.shape == (2, 3) for v in params.values())
    torch.testing.assert_close(post.from_params(params), theta.detach(), rtol=1e-10, atol=1e-10)


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_initial_point(name):
    post = POSTERIORS[name]
    a = post.initial_point(torch.Generator().manual_seed(4))
    b = post.initial_point(torch.Generator().manual_seed(4))
    assert a.shape == (post.dim,) and a.dtype == torch.float64 and torch.equal(a, b)
    assert torch.isfinite(post.log_density(a))
    with pytest.raises(ValueError, match="shape"):
        post.log_density(torch.zeros(post.dim + 1, dtype=torch.float64))


@needs_data
def test_garch_scan_equals_loop_at_extreme_parameters():
    """The log-depth scan of the variance recursion against a plain torch loop, beta1 from ~e^-30 to ~1-alpha1."""
    post = POSTERIORS["garch-garch11"]
    y, v1 = post.data()["y"], post.data()["sigma1"] ** 2
    theta = torch.tensor([[5.0, 0.3, 0.3, -30.0], [5.0, -2.0, -3.0, 8.0], [4.0, 1.0, 2.0, 0.0], [6.0, 0.0, -8.0, 12.0]])
    p = post.to_params(theta.double())
    for k in range(len(theta)):
        mu, a0, a1, b1 = (p[n][k] for n in ("mu", "alpha0", "alpha1", "beta1"))
        v = [v1]
        for t in range(1, len(y)):
            v.append(a0 + a1 * (y[t - 1] - mu) ** 2 + b1 * v[-1])
        v = torch.stack(v)
        loop = torch.distributions.Normal(mu, v.sqrt()).log_prob(y).sum()
        log_jac = torch.log(a0 * a1 * b1 * (1 - a1 - b1))
        torch.testing.assert_close(post.log_density(theta[k].double()), loop + log_jac, rtol=1e-12, atol=1e-9)
