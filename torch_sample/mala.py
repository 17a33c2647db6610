"""The Metropolis-adjusted Langevin algorithm (Roberts & Tweedie 1996)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .metropolis import MetropolisSampler

__all__ = ["MALA"]


class MALA(MetropolisSampler):
    """Proposal θ' = θ − h·M⁻¹∇U(θ) + √(2hT)·M^(−1/2)·ξ (h = ``lr``), accepted with probability
    min(1, exp(−(U(θ') − U(θ))/T) · q(θ | θ') / q(θ' | θ)), log q(a | b) = −‖a − b + hM⁻¹∇U(b)‖²_M/(4hT),
    with ‖v‖²_M = vᵀMv. The inverse mass matrix (preconditioner) M⁻¹ starts at I and is estimated
    in Stan's windows by ``adapt(True, num_warmup=...)``, as for `HMC`: diagonal
    (``state[p]["inv_mass"]``), or dense over all parameters with ``dense_mass=True``
    (``inv_mass_dense``; for small models with correlated parameters).

    ``step(closure)``; ``stats``: lp (= −U/T at the new state), acceptance_rate, step_size,
    diverging, energy_error ((U' − U)/T of the proposal), n_steps (1), grad_evals (N).
    Default adaptation target 0.574 (Roberts & Rosenthal 1998).
    """

    default_target_accept = 0.574
    adapts_mass = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:
        if closure is None:
            raise ValueError("MALA.step needs the closure that computes the full-data loss and calls backward")
        cur = self._current_point(closure)
        h, temp = self.step_size, self.temperature
        start = [p.detach().clone() for p in self._params()]
        proposal = self._langevin_proposal(start, cur.grads)
        with self._restoring_on_error(start, cur):
            self._set(proposal)
            new = self._evaluate(closure)
        log_alpha = -math.inf
        energy_error = math.inf
        if new.finite:
            energy_error = (new.potential - cur.potential) / temp

            def log_q(a, b, grad_b):  # log q(a | b) up to a constant: −‖a − b + hM⁻¹∇U(b)‖²_M / (4hT)
                drift = self.metric.times_inv_mass(grad_b)
                return -self.metric.quad_mass([ai - bi + h * d for ai, bi, d in zip(a, b, drift)]) / (4 * h * temp)

            log_alpha = -energy_error + log_q(start, proposal, new.grads) - log_q(proposal, start, cur.grads)
        diverging = not new.finite or energy_error > self.max_energy_error
        accept_prob = 0.0 if diverging else min(1.0, math.exp(min(0.0, log_alpha)))
        self._accept_or_reject(accept_prob, diverging, new, start, cur)
        self.stats = {"lp": -self._current.potential / temp, "acceptance_rate": accept_prob,
                      "step_size": h, "diverging": float(diverging), "energy_error": energy_error,
                      "n_steps": 1.0, "grad_evals": float(self.num_data)}
        self._adapt_after_step(accept_prob)
        return torch.tensor(self._current.potential)
