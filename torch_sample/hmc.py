"""Hamiltonian Monte Carlo with a diagonal mass matrix (Duane et al. 1987; Neal 2011)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .metropolis import MetropolisSampler
from .priors import Prior

__all__ = ["HMC", "leapfrog"]


def leapfrog(
    position: list[torch.Tensor],
    momentum: list[torch.Tensor],
    grad: list[torch.Tensor],
    step_size: float,
    inv_mass: list[torch.Tensor] | Callable[[list[torch.Tensor]], list[torch.Tensor]],
    grad_fn: Callable[[list[torch.Tensor]], tuple[bool, list[torch.Tensor]]],
    temperature: float = 1.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], bool]:
    """One leapfrog step of H(θ, r) = U(θ)/T + ½ rᵀM⁻¹r: r ← r − ε/2·∇U/T; θ ← θ + ε·M⁻¹r;
    r ← r − ε/2·∇U(θ)/T, **in place** on ``position`` and ``momentum`` (`HMC.step` passes its
    parameters and its momentum; clone them to keep the old values). ``inv_mass`` is M⁻¹'s diagonal
    (tensors shaped like the position) or a function v ↦ M⁻¹v (a dense metric). ``grad_fn(θ)``
    returns (finite, ∇U(θ)), evaluated after θ is updated. Returns (θ, r, ∇U(θ), finite); when not
    finite the momentum has had only its first half step."""
    half = 0.5 * step_size / temperature
    for m, g in zip(momentum, grad):
        m.add_(g, alpha=-half)
    if callable(inv_mass):
        for q, v in zip(position, inv_mass(momentum)):
            q.add_(v, alpha=step_size)
    else:
        for q, w, m in zip(position, inv_mass, momentum):
            q.addcmul_(w, m, value=step_size)
    finite, new_grad = grad_fn(position)
    if finite:
        for m, g in zip(momentum, new_grad):
            m.add_(g, alpha=-half)
    return position, momentum, new_grad, finite


class HMC(MetropolisSampler):
    """``num_leapfrog`` leapfrog steps of size ε = ``lr`` from a momentum r ~ N(0, M), then a
    Metropolis test on H(θ, r) = U(θ)/T + ½ rᵀM⁻¹r. The inverse mass matrix M⁻¹ starts at I and is
    estimated in Stan's windows by ``adapt(True, num_warmup=...)``: diagonal, or dense over all
    parameters with ``dense_mass=True`` (small models with correlated parameters). ``jitter=j``
    draws each iteration's step size uniformly from ε·[1 − j, 1 + j] (Neal 2011, §5.4.2.2): with a
    fixed εL, directions whose period divides the trajectory length barely move.

    ``stats``: lp, acceptance_rate, step_size, diverging (non-finite U/∇U on the path, or an
    energy error above ``max_energy_error``, 1000 as Stan), energy (H at the new state),
    energy_error (H' − H of the proposal), n_steps (L), grad_evals (L·N).
    """

    default_target_accept = 0.8
    adapts_mass = True

    def __init__(self, params: Iterable, lr: float, num_data: int = 1, *, num_leapfrog: int = 10,
                 jitter: float = 0.0, prior: Prior | None = None, temperature: float = 1.0,
                 target_accept: float | None = None, max_energy_error: float = 1000.0, dense_mass: bool = False,
                 generator: torch.Generator | None = None, step_size_tuning: str | None = None):
        if isinstance(num_leapfrog, bool) or not isinstance(num_leapfrog, int) or num_leapfrog < 1:
            raise ValueError(f"num_leapfrog must be an integer >= 1, got {num_leapfrog!r}")
        if not (isinstance(jitter, (int, float)) and 0 <= jitter < 1):
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        super().__init__(params, lr, num_data, prior=prior, temperature=temperature, target_accept=target_accept,
                         max_energy_error=max_energy_error, dense_mass=dense_mass, generator=generator,
                         step_size_tuning=step_size_tuning)
        self.num_leapfrog = num_leapfrog
        self.jitter = float(jitter)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:
        if closure is None:
            raise ValueError("HMC.step needs the closure that computes the full-data loss and calls backward")
        cur = self._current_point(closure)
        eps, temp = self.step_size, self.temperature
        if self.jitter:  # a random ε, independent of the state, breaks the periodic orbits of a fixed εL
            u = torch.rand((), dtype=torch.float64, generator=self.generator,
                           device=self.generator.device if self.generator else None)
            eps *= 1 + self.jitter * (2 * u.item() - 1)
        params = self._params()
        metric = self.metric
        inv_mass = metric.leapfrog_form()
        diagonal = None if metric.dense else inv_mass
        start = [p.detach().clone() for p in params]
        momentum = metric.sample_mass(start)
        h0 = cur.potential / temp + 0.5 * metric.quad_inv_mass(momentum, diagonal)

        new, r = cur, momentum

        def grad_fn(position: list[torch.Tensor]) -> tuple[bool, list[torch.Tensor]]:
            nonlocal new
            new = self._evaluate(closure, params)
            return new.finite, new.grads

        with self._restoring_on_error(start, cur):
            for _ in range(self.num_leapfrog):  # in place on the parameters and on the momentum (which is ours)
                _, _, _, finite = leapfrog(params, r, new.grads, eps, inv_mass, grad_fn, temp)
                if not finite:
                    break
        energy_error = math.inf
        if finite:
            energy_error = new.potential / temp + 0.5 * metric.quad_inv_mass(r, diagonal) - h0
        diverging = not finite or not math.isfinite(energy_error) or energy_error > self.max_energy_error
        accept_prob = 0.0 if diverging else min(1.0, math.exp(min(0.0, -energy_error)))
        # u in float64 like the energies (float32 would resolve only 2⁻²⁴)
        energy = h0 + energy_error if self._accept_or_reject(accept_prob, diverging, new, start, cur) else h0
        self.stats = {"lp": -self._current.potential / temp, "acceptance_rate": accept_prob, "step_size": eps,
                      "diverging": float(diverging), "energy": energy, "energy_error": energy_error,
                      "n_steps": float(self.num_leapfrog), "grad_evals": float(self.num_leapfrog * self.num_data)}
        self._adapt_after_step(accept_prob)
        return torch.tensor(self._current.potential)
