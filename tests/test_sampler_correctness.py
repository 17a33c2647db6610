"""Sampler correctness on linear-Gaussian posteriors, where the sampler's own stationary law is exact.

Two targets, each with K independent chains held as the K rows of one parameter (the loss sums
over chains, so every row gets exactly its own chain's gradient, and the engine's per-example
gradients are exercised: a custom module through the torch.func fallback, and nn.Linear):

- "gaussian": y_i ~ N(θ, Λ⁻¹), θ ∈ R², prior N(0, s0²I). The gradient noise of SGLD does not
  depend on θ and that of SVRG/SGLD-CV vanishes (g_i(θ) − g_i(θ̃) is the same for all i), so
  the stationary covariances of SGLD (noise from the batch), ULA (B = N), SVRG-LD, SGLD-CV and
  the momentum (SGHMC) variant are solutions of discrete Lyapunov equations.
- "linreg": conjugate Bayesian linear regression, y_i = x_iᵀw + ε, ε ~ N(0, 1). The SGLD
  update θ' = (I − hA_S)θ + h b_S + √(2h)ξ has i.i.d. random (A_S, b_S); its stationary
  covariance follows from E[(I − hA_S) ⊗ (I − hA_S)] and E[r_S r_Sᵀ], computed by enumerating
  all batches.

For the unbiased estimators the gradient is affine in θ, so the stationary mean is the exact
posterior mean. Tolerances: 5 Monte Carlo standard errors from batch means (20 batches of the
per-step chain averages, far longer than the ≈ 1/(h·λ_min) ≈ 25-step autocorrelation), so a
correct sampler fails with probability ~1e-6 per entry; seeds are fixed. Where the exact
stationary law is not available (SAGA-LD; the VR samplers on linreg) the covariance must lie
within SGLD's exact bias plus 5 SE of the posterior, and closer to the posterior than SGLD's draws.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
from torch_sample import priors
from vr_mcmc.data import IndexedDataset
from vr_mcmc.per_example import PerExampleGradients

K = 256  # chains
N, B, D = 20, 4, 2
H = 0.01
S0 = 2.0  # prior std
STEPS, BURN, NBATCH = 3000, 500, 20


class GaussianMean(nn.Module):
    """ℓ_i(θ_k) = ½ (y_i − θ_k)ᵀ Λ (y_i − θ_k), summed over the K chains θ_k (rows of theta)."""

    def __init__(self, precision: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(K, D, dtype=torch.float64))
        self.register_buffer("precision", precision)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        diff = y[:, None, :] - self.theta  # [B, K, D]
        return 0.5 * ((diff @ self.precision) * diff).sum((1, 2))


def make_target(kind: str):
    g = torch.Generator().manual_seed(3)
    if kind == "gaussian":
        lam = torch.tensor([[1.5, 0.9], [0.9, 1.2]], dtype=torch.float64)
        y = torch.tensor([0.5, -0.3], dtype=torch.float64) + torch.randn(N, D, generator=g, dtype=torch.float64)
        data = (y,)
        model = GaussianMean(lam)

        def loss_fn(yb):
            return model(yb).mean()

        per_example = [lam for _ in range(N)]  # Hessian of ℓ_i
        offsets = [lam @ y[i] for i in range(N)]  # ∇ℓ_i(θ) = H_i θ − offset_i
    else:
        x = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.6], [0.0, 0.8]],
                                                                                dtype=torch.float64)
        y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.randn(N, generator=g, dtype=torch.float64)
        data = (x, y)
        model = nn.Linear(D, K, bias=False).double()
        with torch.no_grad():
            model.weight.zero_()

        def loss_fn(xb, yb):
            return 0.5 * ((model(xb) - yb[:, None]) ** 2).sum(1).mean()

        per_example = [torch.outer(x[i], x[i]) for i in range(N)]
        offsets = [x[i] * y[i] for i in range(N)]
    hess = [h_.numpy() for h_ in per_example]
    offs = [o.numpy() for o in offsets]
    precision = sum(hess) + np.eye(D) / S0**2
    mean = np.linalg.solve(precision, sum(offs))
    return model, data, loss_fn, hess, offs, precision, mean


def sgld_stationary_cov(hess, offs, precision, mean, batch: int) -> np.ndarray:
    """Exact stationary covariance of SGLD with uniform batches of ``batch`` drawn i.i.d. per step."""
    eye = np.eye(D)
    mm = np.zeros((D * D, D * D))
    rr = np.zeros((D, D))
    subsets = list(itertools.combinations(range(N), batch))
    for s in subsets:
        a = N / batch * sum(hess[i] for i in s) + eye / S0**2
        r = N / batch * sum(offs[i] for i in s) - a @ mean
        m = eye - H * a
        mm += np.kron(m, m)
        rr += np.outer(r, r)
    mm /= len(subsets)
    rr /= len(subsets)
    rhs = (H**2 * rr + 2 * H * eye).reshape(-1)
    return np.linalg.solve(np.eye(D * D) - mm, rhs).reshape(D, D)


def ula_stationary_cov(precision, momentum: float = 0.0) -> np.ndarray:
    """Exact stationary covariance of θ for the full-gradient update (with heavy-ball momentum μ)."""
    eye = np.eye(D)
    if momentum == 0:
        m = eye - H * precision
        return scipy.linalg.solve_discrete_lyapunov(m, 2 * H * eye)
    c = np.sqrt(2 * (1 - momentum) * H) / H  # buf gets −c·ξ; θ ← θ − h·buf
    f = np.block([[eye - H * precision, -H * momentum * eye], [precision, momentum * eye]])
    g = np.vstack([H * c * eye, -c * eye])
    return scipy.linalg.solve_discrete_lyapunov(f, g @ g.T)[:D, :D]


def run(kind: str, method: str, momentum: float = 0.0, seed: int = 0):
    model, data, loss_fn, hess, offs, precision, mean = make_target(kind)
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    batches = torch.Generator().manual_seed(seed + 1)
    loader = DataLoader(IndexedDataset(TensorDataset(*data)), batch_size=N)
    common = dict(prior=priors.Normal(S0), generator=gen)
    engine = None
    if method in ("sgld", "ula"):
        sampler = torch_sample.SGLD([param], lr=H, num_data=N, momentum=momentum, **common)
    elif method == "saga":
        engine = PerExampleGradients(model)
        sampler = torch_sample.SAGALD([param], lr=H, num_data=N, engine=engine, **common)
    elif method == "svrg":
        sampler = torch_sample.SVRGLD([param], lr=H, num_data=N, snapshot_every=N // B, loader=loader,
                                      loss_fn=loss_fn, **common)
    else:
        sampler = torch_sample.SGLDCV([param], lr=H, num_data=N, loader=loader, loss_fn=loss_fn,
                                      centre=[torch.tensor(mean).expand(K, D)], **common)
    with torch.no_grad():
        param.copy_(torch.tensor(mean) + torch.randn(K, D, generator=gen, dtype=torch.float64) / 3)
    means, covs = [], []
    for t in range(STEPS):
        idx = torch.arange(N) if method == "ula" else torch.randperm(N, generator=batches)[:B]
        batch = [d[idx] for d in data]

        def closure(batch=batch):
            sampler.zero_grad()
            loss = loss_fn(*batch)
            loss.backward()
            return loss

        sampler.step(closure, indices=idx)
        if t >= BURN:
            w = param.detach().numpy() - mean
            means.append(w.mean(0))
            covs.append(w.T @ w / K)
    if engine is not None:
        engine.remove()
    means, covs = np.array(means), np.array(covs)

    def estimate(series):
        batches_ = series[: len(series) // NBATCH * NBATCH].reshape(NBATCH, -1, *series.shape[1:]).mean(1)
        return batches_.mean(0), batches_.std(0, ddof=1) / np.sqrt(NBATCH)

    return (estimate(means), estimate(covs), dict(hess=hess, offs=offs, precision=precision, mean=mean))


def posterior_cov(info):
    return np.linalg.inv(info["precision"])


@pytest.mark.parametrize("kind", ["gaussian", "linreg"])
def test_sgld_and_ula_match_their_exact_stationary_laws(kind):
    for method, batch in (("sgld", B), ("ula", N)):
        (m, m_se), (c, c_se), info = run(kind, method)
        np.testing.assert_array_less(np.abs(m), 5 * m_se + 1e-12)  # mean: exact posterior mean
        exact = sgld_stationary_cov(info["hess"], info["offs"], info["precision"], info["mean"], batch)
        if method == "ula":  # the full-data law is the textbook ULA one
            np.testing.assert_allclose(exact, ula_stationary_cov(info["precision"]), rtol=1e-10)
        assert np.all(np.abs(c - exact) <= 5 * c_se), (method, c, exact, c_se)
        # the known bias is real and resolved: the draws tell the step-h law from the posterior
        assert np.abs(c - posterior_cov(info)).max() > 3 * c_se.max()


def test_sghmc_matches_its_exact_stationary_law():
    (m, m_se), (c, c_se), info = run("gaussian", "ula", momentum=0.5)
    np.testing.assert_array_less(np.abs(m), 5 * m_se + 1e-12)
    exact = ula_stationary_cov(info["precision"], momentum=0.5)
    assert np.all(np.abs(c - exact) <= 5 * c_se), (c, exact, c_se)


@pytest.mark.parametrize("kind", ["gaussian", pytest.param("linreg", marks=pytest.mark.slow)])  # 11 s more
def test_variance_reduced_samplers_are_at_least_as_accurate_as_sgld(kind):
    _, (c_sgld, _), info = run(kind, "sgld")
    post = posterior_cov(info)
    exact_sgld = sgld_stationary_cov(info["hess"], info["offs"], info["precision"], info["mean"], B)
    for method in ("saga", "svrg", "cv"):
        (m, m_se), (c, c_se), _ = run(kind, method)
        np.testing.assert_array_less(np.abs(m), 5 * m_se + 1e-12)
        assert np.all(np.abs(c - post) <= np.abs(exact_sgld - post) + 5 * c_se), (method, c, post, c_se)
        assert np.abs(c - post).max() <= np.abs(c_sgld - post).max(), (method, c, c_sgld, post)
        if kind == "gaussian" and method in ("svrg", "cv"):  # no gradient noise at all: exactly ULA
            assert np.all(np.abs(c - ula_stationary_cov(info["precision"])) <= 5 * c_se)
