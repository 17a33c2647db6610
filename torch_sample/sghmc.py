"""Stochastic-gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014), one diffusion of DESIGN.md §11."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from vr_mcmc.estimators import Estimator

from ._shared import check_number, gaussian_noise
from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["SGHMC"]


class SGHMC(LangevinSampler):
    """Underdamped Langevin dynamics with a stochastic gradient, in Chen et al. (2014)'s and posteriors'
    ``sghmc`` parametrization: momentum r (unit mass), friction α, step h = ``lr``.

    The diffusion dθ = r dt, dr = −∇U(θ) dt − α·r dt + √(2αT) dW leaves exp(−U(θ)/T − |r|²/(2T))
    invariant. One step, semi-implicit (symplectic) Euler with the gradient estimate ∇Ũ at the current θ::

        r ← (1 − h·α)·r − h·∇Ũ(θ) + √(h·T·(2α − h·β))·ξ,   ξ ~ N(0, I)
        θ ← θ + h·r

    β is the gradient noise's variance per coordinate divided by T (h·∇Ũ adds h²·T·β to r's variance;
    Chen et al.'s B̂ = T·β), subtracted from the injected noise so that the total matches 2αhT. ``beta``: a
    number ≥ 0 (default 0: no correction, as in posteriors), or ``"auto"``: the estimate from the estimator's
    per-example gradients (needs ``engine=``; each parameter tensor's mean variance, re-measured every
    ``noise_ratio_every``-th step and kept between; 0 until measured, and clipped so that the injected variance
    stays ≥ 0). With v = h·r this is Chen et al.'s eq. (15) with learning rate η = h² and friction h·α, and
    torch_sample.SGLD(momentum=μ, lr=η) is the same chain with h = √η, α = (1 − μ)/√η.

    Requires friction α > 0 and h·α ≤ 1 (r's damping factor 1 − h·α in [0, 1)). ``temperature=0``: SGD with
    momentum. ``estimator=``: any `vr_mcmc.estimators` estimate (SAGA-SGHMC, SVRG-SGHMC, SGHMC-CV).
    ``schedule=``: e.g. `torch_sample.schedules.Cyclical` (cSGHMC).

    ``stats`` adds ``kinetic_energy`` = ½|r|² (≈ T·P/2 at stationarity, P the number of parameters: a cheap
    check of the chain's temperature). ``noise_ratio`` = h²·Var(∇Ũ)/(h·T·(2α − h·β)·P): the gradient noise's
    variance in r per step over the injected noise's.
    """

    extra_stats = ("kinetic_energy",)

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        friction: float = 0.1,
        *,
        beta: float | str = 0.0,
        prior: Prior | None = None,
        temperature: float = 1.0,
        estimator: Estimator | None = None,
        engine: Any = None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
        schedule: Any = None,
    ):
        if beta == "auto" and engine is None and getattr(estimator, "engine", None) is None:
            raise ValueError("SGHMC(beta='auto') estimates the gradient noise from per-example gradients: pass "
                             "engine=vr_mcmc.per_example.PerExampleGradients(model), or a number for beta")
        super().__init__(params, lr, num_data, estimator, prior=prior, temperature=temperature,
                         loss_reduction=loss_reduction, engine=engine, generator=generator,
                         max_divergences=max_divergences, schedule=schedule,
                         extra_defaults=dict(friction=friction, beta=beta))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        friction = check_number("friction (α)", group["friction"], 0.0, strict=True)
        lr = check_number("lr (the step size)", group["lr"], 0.0, strict=True)
        if lr * friction > 1.0:
            raise ValueError(f"SGHMC needs lr·friction ≤ 1 (r is damped by 1 − h·α each step), got lr={lr:g}, "
                             f"friction={friction:g}: lower the step size or the friction")
        beta = group["beta"]
        if beta != "auto":
            beta = check_number("beta (the gradient-noise estimate)", beta, 0.0, strict=False)
            if lr * beta > 2.0 * friction:
                raise ValueError(f"SGHMC needs lr·beta ≤ 2·friction (the injected variance h·T·(2α − h·β) must be "
                                 f"≥ 0), got lr={lr:g}, beta={beta:g}, friction={friction:g}: raise the friction")
        if group["momentum"] or group["nesterov"]:
            raise ValueError("SGHMC has its own momentum (friction=α); momentum=/nesterov= belong to SGLD")
        super().add_param_group(param_group)

    def _beta(self, group: dict[str, Any], p: torch.Tensor) -> float:
        if group["beta"] != "auto":
            return float(group["beta"])
        var = self._noise_var_of(p)
        if not math.isfinite(var) or group["temperature"] <= 0:
            return 0.0
        return min(var / group["temperature"], 2.0 * group["friction"] / group["lr"])

    def _update(self, params, grads, states, group):
        h, alpha, temp = group["lr"], group["friction"], group["temperature"]
        moms = []
        for state, p in zip(states, params):
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p)
            moms.append(state["momentum"])
        torch._foreach_mul_(moms, 1.0 - h * alpha)
        torch._foreach_add_(moms, grads, alpha=-h)
        if temp > 0:
            for p, r in zip(params, moms):
                var = h * temp * (2.0 * alpha - h * self._beta(group, p))
                if var > 0:
                    r.add_(gaussian_noise(p, self.generator), alpha=math.sqrt(var))
        torch._foreach_add_(params, moms, alpha=h)
        return {"kinetic_energy": 0.5 * float(sum(n * n for n in torch._foreach_norm(moms)))}

    def _noise_terms(self, group, p):
        h, alpha, temp = group["lr"], group["friction"], group["temperature"]
        return h * h, h * temp * max(2.0 * alpha - h * self._beta(group, p), 0.0) * p.numel()
