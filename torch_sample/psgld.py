"""Preconditioned SGLD (Li, Chen, Carlson & Carin 2016), one diffusion of DESIGN.md §11."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from vr_mcmc.estimators import Estimator

from ._shared import check_number, gaussian_noise
from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["PSGLD"]


class PSGLD(LangevinSampler):
    """Langevin dynamics with RMSprop's diagonal preconditioner G (Li et al. 2016), step h = ``lr``::

        V ← α·V + (1 − α)·∇Ũ⊙∇Ũ          (V = ∇Ũ⊙∇Ũ at the first step; unchanged once frozen)
        G = 1 / (ε + √V)
        θ ← θ − h·G⊙∇Ũ + h·T·Γ + √(2hT)·√G⊙ξ,   ξ ~ N(0, I)

    ∇Ũ is the whole estimate (data term from the estimator, plus the prior), so the step is scale-free:
    h·G⊙∇Ũ ≈ h·sign(∇Ũ) where ε is negligible. With G constant this is exact Langevin dynamics in the
    metric G (its law tends to π for h → 0); a G that moves with θ needs Γ_i = ∂G_i/∂θ_i, which Li et al.
    drop (their bias is O(h) and vanishes as α → 1). ``correction=True`` adds h·T·Γ with Γ estimated from
    the step's own change of G: Γ_i ≈ −G_i²·(1 − α)·∇Ũ_i·Ĥ_ii/√V_i with the secant curvature
    Ĥ_ii = Δ∇Ũ_i/Δθ_i of the last two steps (noisy under minibatches; 0 where Δθ_i = 0).
    `freeze_preconditioner` (e.g. after warmup) stops V's updates: then Γ = 0 and the chain is an exact
    preconditioned SGLD, which is what to use for sampling (the freeze is saved in ``state_dict``).

    Where ∇Ũ is ~0 at the first step (exact or variance-reduced gradients started at a mode), V = 0 and
    G = 1/ε: the first steps then jump far. Start away from the mode, or raise ``eps`` to the scale of |∇Ũ|.
    ``alpha`` (0 ≤ α < 1, default 0.99) and ``eps`` (> 0, default 1e-5) as torch.optim.RMSprop's.
    ``estimator=``/``schedule=``/``temperature`` as for SGLD (SVRG-pSGLD: ``estimator=SVRG(...)``).
    ``stats`` adds ``preconditioner``: the mean of G over all coordinates. ``noise_ratio`` =
    Σ_p h²·ḡ_p²·Var_p / Σ_p 2hT·ΣG_p with ḡ_p the mean of G over parameter p (each tensor's variance
    weighted by its mean preconditioner: the injected noise is √(2hTG)·ξ).
    """

    extra_stats = ("preconditioner",)

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        alpha: float = 0.99,
        eps: float = 1e-5,
        *,
        correction: bool = False,
        prior: Prior | None = None,
        temperature: float = 1.0,
        estimator: Estimator | None = None,
        engine: Any = None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
        schedule: Any = None,
    ):
        if not isinstance(correction, bool):
            raise TypeError(f"correction must be True or False, got {correction!r}")
        super().__init__(params, lr, num_data, estimator, prior=prior, temperature=temperature,
                         loss_reduction=loss_reduction, engine=engine, generator=generator,
                         max_divergences=max_divergences, schedule=schedule,
                         extra_defaults=dict(alpha=alpha, eps=eps, correction=correction))
        self.preconditioner_frozen = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        check_number("alpha (RMSprop's decay)", group["alpha"], 0.0, strict=False, high=1.0)
        check_number("eps (RMSprop's floor)", group["eps"], 0.0, strict=True)
        if group["momentum"] or group["nesterov"]:
            raise ValueError("PSGLD has no momentum: use SGHMC or SGNHT for an underdamped diffusion")
        super().add_param_group(param_group)

    def freeze_preconditioner(self, frozen: bool = True) -> None:
        """Stops (or, with False, resumes) the updates of V: G stays as it is, Γ = 0."""
        self.preconditioner_frozen = bool(frozen)

    def _update(self, params, grads, states, group):
        h, a, eps, temp = group["lr"], group["alpha"], group["eps"], group["temperature"]
        noise_scale = math.sqrt(2.0 * h * temp) if temp > 0 else 0.0
        g_sum = 0.0
        count = 0
        for p, g, state in zip(params, grads, states):
            if "square_avg" not in state:
                state["square_avg"] = g * g
            elif not self.preconditioner_frozen:
                state["square_avg"].mul_(a).addcmul_(g, g, value=1.0 - a)
            v = state["square_avg"]
            precond = (v.sqrt() + eps).reciprocal_()
            gamma = None
            if group["correction"] and not self.preconditioner_frozen and temp > 0:
                if "prev_param" in state:
                    dtheta = p - state["prev_param"]
                    moved = dtheta != 0
                    curv = torch.where(moved, (g - state["prev_grad"]) / torch.where(moved, dtheta, 1.0), 0.0)
                    gamma = -precond.square() * (1.0 - a) * g * curv / v.sqrt().clamp_min(eps)
                state["prev_param"] = p.detach().clone()  # θ_t and ∇Ũ(θ_t): the next step's secant
                state["prev_grad"] = g.detach().clone()
            p.addcmul_(precond, g, value=-h)
            if gamma is not None:
                p.add_(gamma, alpha=h * temp)
            if noise_scale:
                p.addcmul_(precond.sqrt(), gaussian_noise(p, self.generator), value=noise_scale)
            g_sum += float(precond.sum())
            count += p.numel()
        return {"preconditioner": g_sum / max(count, 1) if self._first(group) else 0.0}

    def _first(self, group: dict[str, Any]) -> bool:
        return group["params"] is self.param_groups[0]["params"]

    def _noise_terms(self, group, p):
        v = self.state[p].get("square_avg")
        if v is None:
            return 0.0, 0.0
        precond = (v.sqrt() + group["eps"]).reciprocal()
        h, temp = group["lr"], group["temperature"]
        return h * h * float(precond.mean()) ** 2, 2.0 * h * temp * float(precond.sum())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["preconditioner_frozen"] = self.preconditioner_frozen
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.preconditioner_frozen = bool(state_dict.pop("preconditioner_frozen", False))
        super().load_state_dict(state_dict)
