"""Seven posteriordb reference posteriors as torch log densities over one flat float64 vector θ.

Each :class:`RefPosterior` gives log π(θ) = log prior + log likelihood + log|det J| over the unconstrained θ ∈ R^dim
(autograd gives ∇log π), the map θ -> constrained parameters named as in the reference draws, its inverse, a random
start and the reference draws (10 chains x 1000 draws, rstan NUTS). The math follows
``tests/data/refposteriors/INDEX.md`` (posteriordb commit 28f8d3d, BSD-3 (c) Stan Developers); no Stan code is used.
Additive constants are partly dropped (e.g. the factor 2 of half-priors), which no sampler sees.

The data ship with the repository in ``tests/data/refposteriors`` (posteriordb's JSON files, unchanged but
xz-compressed; source and license in the README there); the environment variable ``VR_MCMC_REFPOSTERIORS`` names
another folder (plain ``NAME.kind.json`` or ``NAME.kind.json.xz``). Importing never fails when the data are missing:
:func:`available` says whether they are there, and :func:`unavailable_reason` says why not (for
``pytest.mark.skipif``). Data are read lazily and cached.

Every function takes θ of shape [..., dim] (leading batch dims allowed, e.g. vectorized chains) and returns [...].
"""

from __future__ import annotations

import functools
import json
import lzma
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "POSTERIORS",
    "REFPOSTERIOR_DIR",
    "RefPosterior",
    "available",
    "unavailable_reason",
]

ENV_VAR = "VR_MCMC_REFPOSTERIORS"
REFPOSTERIOR_DIR: Path = Path(os.environ.get(ENV_VAR) or Path(__file__).resolve().parent / "data" / "refposteriors")

_LOG_2PI = math.log(2.0 * math.pi)
Tensor = torch.Tensor
Params = dict[str, Tensor]
Data = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers


def _normal_lpdf(
    x: Tensor, loc: Tensor | float, scale: Tensor | float, log_scale: Tensor | float | None = None
) -> Tensor:
    """log N(x | loc, scale) = -½·log 2π - log scale - (x-loc)²/(2·scale²), elementwise."""
    if log_scale is None:
        log_scale = torch.log(scale) if isinstance(scale, Tensor) else math.log(scale)
    return -0.5 * _LOG_2PI - log_scale - 0.5 * ((x - loc) / scale).square()


def _log_sigmoid(u: Tensor) -> Tensor:
    """log σ(u) = -softplus(-u) (stable)."""
    return -F.softplus(-u)


def _log1m_sigmoid(u: Tensor) -> Tensor:
    """log(1 - σ(u)) = -softplus(u) (stable)."""
    return -F.softplus(u)


def _as_tensor(value: Any) -> Tensor:
    """float64 tensor view of a number, array or tensor (tensors keep their dtype if floating)."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value
    return torch.tensor(np.asarray(value, dtype=np.float64))


def _indexed(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}[{i}]" for i in range(1, n + 1))


# ---------------------------------------------------------------------------------------------------------------------
# Linear regressions (sblri, sblrc, nes1992, earnings): θ = (beta_1..D, s), sigma = exp(s)


def _regression_log_density(theta: Tensor, data: Data, prior_scale: float | None) -> Tensor:
    """Σ_n log N(y_n | x_nᵀβ, e^s) + s, plus Σ_d log N(β_d | 0, c) + log N(e^s | 0, c) when prior_scale c is given."""
    beta, s = theta[..., :-1], theta[..., -1]
    resid = data["y"] - beta @ data["X"].T  # [..., N]
    n = resid.shape[-1]
    lp = -0.5 * n * _LOG_2PI - n * s - 0.5 * torch.exp(-2.0 * s) * resid.square().sum(-1) + s
    if prior_scale is not None:
        lp = lp + _normal_lpdf(beta, 0.0, prior_scale).sum(-1) + _normal_lpdf(torch.exp(s), 0.0, prior_scale)
    return lp


def _regression_to_params(theta: Tensor) -> Params:
    """beta[d] = θ_d, sigma = exp(θ_D+1)."""
    out = {name: theta[..., d] for d, name in enumerate(_indexed("beta", theta.shape[-1] - 1))}
    out["sigma"] = torch.exp(theta[..., -1])
    return out


def _regression_from_params(params: Mapping[str, Any], n_beta: int) -> Tensor:
    beta = [_as_tensor(params[name]) for name in _indexed("beta", n_beta)]
    return torch.stack([*beta, torch.log(_as_tensor(params["sigma"]))], -1)


def _prepare_sblr(raw: dict[str, Any]) -> Data:
    """X (N×5, no intercept) and y as given."""
    return {"X": torch.tensor(raw["X"], dtype=torch.float64), "y": torch.tensor(raw["y"], dtype=torch.float64)}


def _prepare_nes(raw: dict[str, Any]) -> Data:
    """x_n = [1, real_ideo, race_adj, 1{age=2}, 1{age=3}, 1{age=4}, educ1, gender, income]; y = partyid7."""
    col = {k: torch.tensor(raw[k], dtype=torch.float64) for k in raw if isinstance(raw[k], list)}
    age = col["age_discrete"]
    X = torch.stack(
        [
            torch.ones_like(age),
            col["real_ideo"],
            col["race_adj"],
            (age == 2).double(),
            (age == 3).double(),
            (age == 4).double(),
            col["educ1"],
            col["gender"],
            col["income"],
        ],
        -1,
    )
    return {"X": X, "y": col["partyid7"]}


def _prepare_earnings(raw: dict[str, Any]) -> Data:
    """y = log earn; z = (height - mean)/sd (sd with N-1, full data); x_n = [1, z, male, z·male]."""
    earn = torch.tensor(raw["earn"], dtype=torch.float64)
    height = torch.tensor(raw["height"], dtype=torch.float64)
    male = torch.tensor(raw["male"], dtype=torch.float64)
    z = (height - height.mean()) / height.std(correction=1)
    return {"X": torch.stack([torch.ones_like(z), z, male, z * male], -1), "y": torch.log(earn)}


# ---------------------------------------------------------------------------------------------------------------------
# Two-component Gaussian mixture: θ = (u1, u2, s1, s2, v); mu1 = u1, mu2 = u1 + e^u2, sigma_k = e^s_k, theta = σ(v)


def _gauss_mix_log_density(theta: Tensor, data: Data) -> Tensor:
    """Σ_k [log N(mu_k|0,2) + log N(sigma_k|0,2)] + log Beta(θ|5,5) + Σ_n log(θ N(y|mu1,σ1) + (1-θ) N(y|mu2,σ2))
    + log|J|, with log|J| = u2 + s1 + s2 + log σ(v) + log(1-σ(v))."""
    u1, u2, s1, s2, v = theta.unbind(-1)
    mu1, mu2 = u1, u1 + torch.exp(u2)
    sig1, sig2 = torch.exp(s1), torch.exp(s2)
    log_w, log_1mw = _log_sigmoid(v), _log1m_sigmoid(v)
    prior = (
        _normal_lpdf(mu1, 0.0, 2.0)
        + _normal_lpdf(mu2, 0.0, 2.0)
        + _normal_lpdf(sig1, 0.0, 2.0)
        + _normal_lpdf(sig2, 0.0, 2.0)
        + 4.0 * log_w  # Beta(5, 5) up to its normalizing constant
        + 4.0 * log_1mw
    )
    y = data["y"]
    l1 = log_w[..., None] + _normal_lpdf(y, mu1[..., None], sig1[..., None], s1[..., None])
    l2 = log_1mw[..., None] + _normal_lpdf(y, mu2[..., None], sig2[..., None], s2[..., None])
    lik = torch.logaddexp(l1, l2).sum(-1)
    return prior + lik + u2 + s1 + s2 + log_w + log_1mw


def _gauss_mix_to_params(theta: Tensor) -> Params:
    u1, u2, s1, s2, v = theta.unbind(-1)
    return {
        "mu[1]": u1,
        "mu[2]": u1 + torch.exp(u2),
        "sigma[1]": torch.exp(s1),
        "sigma[2]": torch.exp(s2),
        "theta": torch.sigmoid(v),
    }


def _gauss_mix_from_params(params: Mapping[str, Any]) -> Tensor:
    mu1, mu2 = _as_tensor(params["mu[1]"]), _as_tensor(params["mu[2]"])
    w = _as_tensor(params["theta"])
    return torch.stack(
        [
            mu1,
            torch.log(mu2 - mu1),
            torch.log(_as_tensor(params["sigma[1]"])),
            torch.log(_as_tensor(params["sigma[2]"])),
            torch.log(w) - torch.log1p(-w),
        ],
        -1,
    )


def _prepare_y(raw: dict[str, Any]) -> Data:
    return {"y": torch.tensor(raw["y"], dtype=torch.float64)}


# ---------------------------------------------------------------------------------------------------------------------
# Eight schools, non-centered: θ = (z_1..8, mu, s), tau = e^s, theta_j = mu + tau·z_j


def _eight_schools_log_density(theta: Tensor, data: Data) -> Tensor:
    """Σ_j log N(z_j|0,1) + log N(mu|0,5) + log Cauchy(tau|0,5) + Σ_j log N(y_j | mu + tau z_j, sigma_j) + s."""
    z, mu, s = theta[..., :8], theta[..., 8], theta[..., 9]
    tau = torch.exp(s)
    prior = (
        _normal_lpdf(z, 0.0, 1.0).sum(-1)
        + _normal_lpdf(mu, 0.0, 5.0)
        - math.log(math.pi * 5.0)
        - torch.log1p((tau / 5.0).square())
    )
    lik = _normal_lpdf(data["y"], mu[..., None] + tau[..., None] * z, data["sigma"]).sum(-1)
    return prior + lik + s


def _eight_schools_to_params(theta: Tensor) -> Params:
    z, mu, tau = theta[..., :8], theta[..., 8], torch.exp(theta[..., 9])
    theta_j = mu[..., None] + tau[..., None] * z
    out = {name: theta_j[..., j] for j, name in enumerate(_indexed("theta", 8))}
    out["mu"], out["tau"] = mu, tau
    return out


def _eight_schools_from_params(params: Mapping[str, Any]) -> Tensor:
    """z_j = (theta_j - mu)/tau, s = log tau."""
    mu, tau = _as_tensor(params["mu"]), _as_tensor(params["tau"])
    z = [(_as_tensor(params[name]) - mu) / tau for name in _indexed("theta", 8)]
    return torch.stack([*z, mu, torch.log(tau)], -1)


def _prepare_eight_schools(raw: dict[str, Any]) -> Data:
    return {"y": torch.tensor(raw["y"], dtype=torch.float64), "sigma": torch.tensor(raw["sigma"], dtype=torch.float64)}


# ---------------------------------------------------------------------------------------------------------------------
# GARCH(1,1): θ = (mu, a0, a1, b1); alpha0 = e^a0, alpha1 = σ(a1), beta1 = (1-alpha1)·σ(b1)


def _garch_variances(r: Tensor, alpha0: Tensor, alpha1: Tensor, log_beta1: Tensor, v1: Tensor) -> Tensor:
    """v_1 = v1, v_t = alpha0 + alpha1·r_{t-1} + beta1·v_{t-1}, for r [..., T] and per-batch scalars [...].

    The affine recursion with constant coefficient beta1 is v_t = Σ_{k≤t} beta1^{t-k} c_k (c_1 = v1,
    c_t = alpha0 + alpha1·r_{t-1}); it is computed by a log-depth (Hillis-Steele) scan: ⌈log2 T⌉ shifted adds,
    all terms positive (no cancellation), batch-friendly and much cheaper under autograd than a T-step loop.
    """
    c = torch.cat([v1.expand(r[..., :1].shape), alpha0[..., None] + alpha1[..., None] * r[..., :-1]], -1)
    T = c.shape[-1]
    log_b = log_beta1[..., None]
    d = 1
    while d < T:
        c = torch.cat([c[..., :d], c[..., d:] + torch.exp(d * log_b) * c[..., :-d]], -1)
        d *= 2
    return c


def _garch_log_density(theta: Tensor, data: Data) -> Tensor:
    """Σ_t log N(y_t | mu, √v_t) + log|J| (flat priors),
    log|J| = a0 + log σ(a1) + 2·log(1-σ(a1)) + log σ(b1) + log(1-σ(b1))."""
    mu, a0, a1, b1 = theta.unbind(-1)
    log_1m_alpha1 = _log1m_sigmoid(a1)
    log_beta1 = log_1m_alpha1 + _log_sigmoid(b1)
    r = (data["y"] - mu[..., None]).square()
    v = _garch_variances(r, torch.exp(a0), torch.sigmoid(a1), log_beta1, data["sigma1"].square())
    lik = (-0.5 * _LOG_2PI - 0.5 * torch.log(v) - 0.5 * r / v).sum(-1)
    log_jac = a0 + _log_sigmoid(a1) + 2.0 * log_1m_alpha1 + _log_sigmoid(b1) + _log1m_sigmoid(b1)
    return lik + log_jac


def _garch_to_params(theta: Tensor) -> Params:
    mu, a0, a1, b1 = theta.unbind(-1)
    return {
        "mu": mu,
        "alpha0": torch.exp(a0),
        "alpha1": torch.sigmoid(a1),
        "beta1": torch.sigmoid(-a1) * torch.sigmoid(b1),
    }


def _garch_from_params(params: Mapping[str, Any]) -> Tensor:
    """a0 = log alpha0, a1 = logit alpha1, b1 = logit(beta1 / (1 - alpha1))."""
    alpha1 = _as_tensor(params["alpha1"])
    p = _as_tensor(params["beta1"]) / (1.0 - alpha1)
    return torch.stack(
        [
            _as_tensor(params["mu"]),
            torch.log(_as_tensor(params["alpha0"])),
            torch.log(alpha1) - torch.log1p(-alpha1),
            torch.log(p) - torch.log1p(-p),
        ],
        -1,
    )


def _prepare_garch(raw: dict[str, Any]) -> Data:
    return {
        "y": torch.tensor(raw["y"], dtype=torch.float64),
        "sigma1": torch.tensor(float(raw["sigma1"]), dtype=torch.float64),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Files and caches


def available() -> bool:
    """True if the data folder holds the data and draws of every posterior."""
    return not unavailable_reason()


def unavailable_reason() -> str:
    """Empty if available, else why not (a skip reason)."""
    missing = [f"{name}.{kind}.json[.xz]" for name in POSTERIORS for kind in ("data", "draws") if not _path(name, kind)]
    if not missing:
        return ""
    return (
        f"reference posteriors not found in {REFPOSTERIOR_DIR} (they ship in tests/data/refposteriors; {ENV_VAR} "
        "names another folder); "
        f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    )


def _path(name: str, kind: str) -> Path | None:
    """Posterior ``name``'s file ``kind`` ("data" or "draws"): plain JSON, else xz-compressed; None if neither."""
    for suffix in (".json", ".json.xz"):
        path = REFPOSTERIOR_DIR / f"{name}.{kind}{suffix}"
        if path.is_file():
            return path
    return None


def load_json(name: str, kind: str) -> Any:
    """Posterior ``name``'s posteriordb JSON file ``kind`` ("data" or "draws"), parsed."""
    path = _path(name, kind)
    if path is None:
        raise FileNotFoundError(unavailable_reason())
    with (lzma.open(path, "rt") if path.suffix == ".xz" else open(path)) as f:
        return json.load(f)


@functools.cache
def _prepared_data(name: str, dtype: torch.dtype, device: torch.device) -> Data:
    post = POSTERIORS[name]
    data = post.prepare(load_json(name, "data"))
    return {k: v.to(device=device, dtype=dtype) for k, v in data.items()}


@functools.cache
def _reference_draws(name: str) -> dict[str, np.ndarray]:
    chains = load_json(name, "draws")
    out = {}
    for param in chains[0]:
        arr = np.array([chain[param] for chain in chains], dtype=np.float64)
        arr.setflags(write=False)
        out[param] = arr
    return out


@functools.cache
def _reference_theta(name: str) -> Tensor:
    return POSTERIORS[name].from_params(_reference_draws(name))


# ---------------------------------------------------------------------------------------------------------------------
# The public object


@dataclass(frozen=True)
class RefPosterior:
    """One reference posterior: log π(θ) on R^dim, θ -> params, params -> θ, a start, the reference draws.

    ``param_names`` are the parameter names of the reference draws (the keys of :meth:`to_params` and
    :meth:`reference`); ``transform`` describes θ in words.
    """

    name: str
    dim: int
    param_names: tuple[str, ...]
    transform: str
    prepare: Callable[[dict[str, Any]], Data] = field(repr=False)
    _log_density: Callable[[Tensor, Data], Tensor] = field(repr=False)
    _to_params: Callable[[Tensor], Params] = field(repr=False)
    _from_params: Callable[[Mapping[str, Any]], Tensor] = field(repr=False)

    def _check(self, theta: Tensor) -> None:
        if theta.shape[-1:] != (self.dim,):
            raise ValueError(f"{self.name}: θ must have shape [..., {self.dim}], got {tuple(theta.shape)}")

    def data(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Data:
        """The prepared data tensors (design matrices etc.; constants from the full data), cached."""
        return _prepared_data(self.name, dtype, torch.device(device))

    def log_density(self, theta: Tensor) -> Tensor:
        """log π(θ) (log prior + log likelihood + log|det J|, up to a constant) for θ [..., dim] -> [...]."""
        self._check(theta)
        return self._log_density(theta, self.data(theta.dtype, theta.device))

    def to_params(self, theta: Tensor) -> Params:
        """θ [..., dim] -> {name in the reference draws: value [...]}."""
        self._check(theta)
        return self._to_params(theta)

    def from_params(self, params: Mapping[str, Any]) -> Tensor:
        """Inverse of :meth:`to_params`: params (tensors/arrays of shape [...]) -> θ [..., dim] (float64 for arrays)."""
        return self._from_params(params)

    def reference(self) -> dict[str, np.ndarray]:
        """Reference draws {param name: read-only array [10 chains, 1000 draws]} (cached)."""
        return _reference_draws(self.name)

    def reference_unconstrained(self) -> Tensor:
        """The reference draws mapped to θ: float64 tensor [10, 1000, dim] (cached; do not modify)."""
        return _reference_theta(self.name)

    def initial_point(self, generator: torch.Generator, shape: tuple[int, ...] = (), scale: float = 1.0) -> Tensor:
        """A random start θ0 = m + scale·sd·ξ, ξ ~ N(0, I), of shape [*shape, dim] (float64, CPU).

        m and sd are the mean and sd of the reference draws mapped to θ (so this uses the reference draws): with
        scale=1 a start from a diagonal Gaussian fit of the posterior in θ, larger scale for over-dispersed chains.
        """
        ref = self.reference_unconstrained().reshape(-1, self.dim)
        xi = torch.randn((*shape, self.dim), generator=generator, dtype=torch.float64)
        return ref.mean(0) + scale * ref.std(0) * xi

    def module(self, scale: float = 2.0) -> type[torch.nn.Module]:
        """A model class for `vr_mcmc.sample`: one parameter ``theta`` [dim], started at `initial_point` with a
        generator seeded from the global RNG (which `sample` seeds per chain: over-dispersed starts); its loss is
        `loss`."""
        post = self

        class Theta(torch.nn.Module):
            def __init__(self):
                super().__init__()
                gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
                self.theta = torch.nn.Parameter(post.initial_point(gen, scale=scale))

        return Theta

    def loss(self, model: torch.nn.Module, batch: Any = None) -> Tensor:
        """−log p(θ | data) of a `module` model (the batch is unused: the data are the posterior's own)."""
        return -self.log_density(model.theta)


def _regression(
    name: str, n_beta: int, prior_scale: float | None, prepare: Callable[[dict[str, Any]], Data]
) -> RefPosterior:
    prior = "flat priors" if prior_scale is None else f"N(0,{prior_scale:g}) priors"
    return RefPosterior(
        name=name,
        dim=n_beta + 1,
        param_names=(*_indexed("beta", n_beta), "sigma"),
        transform=f"θ = (beta[1..{n_beta}], log sigma); {prior}",
        prepare=prepare,
        _log_density=functools.partial(_regression_log_density, prior_scale=prior_scale),
        _to_params=_regression_to_params,
        _from_params=functools.partial(_regression_from_params, n_beta=n_beta),
    )


POSTERIORS: dict[str, RefPosterior] = {
    p.name: p
    for p in [
        _regression("sblri-blr", 5, 10.0, _prepare_sblr),
        _regression("sblrc-blr", 5, 10.0, _prepare_sblr),
        _regression("nes1992-nes", 9, None, _prepare_nes),
        _regression("earnings-logearn_interaction_z", 4, None, _prepare_earnings),
        RefPosterior(
            name="low_dim_gauss_mix-low_dim_gauss_mix",
            dim=5,
            param_names=("mu[1]", "mu[2]", "sigma[1]", "sigma[2]", "theta"),
            transform="θ = (mu[1], log(mu[2]-mu[1]), log sigma[1], log sigma[2], logit theta)",
            prepare=_prepare_y,
            _log_density=_gauss_mix_log_density,
            _to_params=_gauss_mix_to_params,
            _from_params=_gauss_mix_from_params,
        ),
        RefPosterior(
            name="eight_schools-eight_schools_noncentered",
            dim=10,
            param_names=(*_indexed("theta", 8), "mu", "tau"),
            transform="θ = (z[1..8] = (theta-mu)/tau, mu, log tau)",
            prepare=_prepare_eight_schools,
            _log_density=_eight_schools_log_density,
            _to_params=_eight_schools_to_params,
            _from_params=_eight_schools_from_params,
        ),
        RefPosterior(
            name="garch-garch11",
            dim=4,
            param_names=("mu", "alpha0", "alpha1", "beta1"),
            transform="θ = (mu, log alpha0, logit alpha1, logit(beta1/(1-alpha1)))",
            prepare=_prepare_garch,
            _log_density=_garch_log_density,
            _to_params=_garch_to_params,
            _from_params=_garch_from_params,
        ),
    ]
}
