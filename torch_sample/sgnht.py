"""The stochastic-gradient Nosé–Hoover thermostat (Ding et al. 2014), one diffusion of DESIGN.md §11."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from vr_mcmc.estimators import Estimator

from ._shared import check_number, gaussian_noise
from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["SGNHT"]


class SGNHT(LangevinSampler):
    """SGNHT (Ding et al. 2014, Algorithm 2, as posteriors' ``sgnht``), step h = ``lr``, diffusion factor A
    (``friction``), one thermostat ξ per param group (initially A), P the group's number of parameters::

        r ← r − h·ξ·r − h·∇Ũ(θ) + √(2·A·h·T)·η,   η ~ N(0, I)
        θ ← θ + h·r
        ξ ← ξ + h·(|r|²/P − T)

    The thermostat is a friction that learns the unknown gradient noise: it rises while the kinetic
    energy per coordinate exceeds T/2 and falls below it, so that the chain's temperature is T without an
    estimate of the noise (Ding et al.'s stationary law: π(θ)·N(r; 0, T·I)·N(ξ; A, ·)). Semi-implicit
    Euler, as `SGHMC`: r moves first, θ with the new r, ξ with the new r.

    ``friction`` A > 0 (default 1.0), with h·A ≤ 1. ``estimator=`` (CV-SGNHT: ``estimator=ControlVariate(...)``),
    ``schedule=``, ``temperature`` as for SGLD. ``stats`` adds ``kinetic_energy`` = ½|r|² and ``thermostat`` ξ
    (of the first param group; ξ ≈ A + (gradient noise variance per coordinate)·h/(2T) at stationarity).
    ``noise_ratio`` = h²·Var(∇Ũ)/(2·A·h·T·P), the gradient noise in r over the injected noise.
    """

    extra_stats = ("kinetic_energy", "thermostat")

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        friction: float = 1.0,
        *,
        prior: Prior | None = None,
        temperature: float = 1.0,
        estimator: Estimator | None = None,
        engine: Any = None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
        schedule: Any = None,
    ):
        super().__init__(params, lr, num_data, estimator, prior=prior, temperature=temperature,
                         loss_reduction=loss_reduction, engine=engine, generator=generator,
                         max_divergences=max_divergences, schedule=schedule,
                         extra_defaults=dict(friction=friction))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        friction = check_number("friction (the diffusion factor A)", group["friction"], 0.0, strict=True)
        lr = check_number("lr (the step size)", group["lr"], 0.0, strict=True)
        if lr * friction > 1.0:
            raise ValueError(f"SGNHT needs lr·friction ≤ 1, got lr={lr:g}, friction={friction:g}: lower either")
        if group["momentum"] or group["nesterov"]:
            raise ValueError("SGNHT has its own momentum and thermostat; momentum=/nesterov= belong to SGLD")
        super().add_param_group(param_group)

    def _update(self, params, grads, states, group):
        h, a, temp = group["lr"], group["friction"], group["temperature"]
        if not params:
            return {}
        head = states[0]
        xi = head.setdefault("thermostat", float(a))
        moms = []
        for state, p in zip(states, params):
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p)
            moms.append(state["momentum"])
        torch._foreach_mul_(moms, 1.0 - h * xi)
        torch._foreach_add_(moms, grads, alpha=-h)
        if temp > 0:
            scale = math.sqrt(2.0 * a * h * temp)
            for p, r in zip(params, moms):
                r.add_(gaussian_noise(p, self.generator), alpha=scale)
        torch._foreach_add_(params, moms, alpha=h)
        sq = float(sum(n * n for n in torch._foreach_norm(moms)))
        size = sum(p.numel() for p in params)
        head["thermostat"] = xi + h * (sq / size - temp)
        stats = {"kinetic_energy": 0.5 * sq}
        if group["params"] is self.param_groups[0]["params"]:
            stats["thermostat"] = head["thermostat"]
        return stats

    def _noise_terms(self, group, p):
        h, a, temp = group["lr"], group["friction"], group["temperature"]
        return h * h, 2.0 * a * h * temp * p.numel()
