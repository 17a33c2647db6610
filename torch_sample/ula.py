"""The unadjusted Langevin algorithm on the full-data gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .closure import ClosureSampler
from .priors import Prior

__all__ = ["ULA"]


class ULA(ClosureSampler):
    """θ ← θ − h·M⁻¹∇U(θ) + √(2hT)·M^(−1/2)·ξ with the exact ∇U from the closure (M⁻¹ = I unless
    set in ``state[p]["inv_mass"]``), no Metropolis test (so a
    discretization bias of order h). A step to a non-finite U or ∇U is undone and marked
    ``diverging``. ``stats``: lp, step_size, diverging, n_steps (1), grad_evals (N). Not adapted
    (no acceptance to aim at): ``adapt`` is refused, and ``vr_mcmc.sample`` runs its warmup steps
    unadapted. On the plain `ClosureSampler` base: no target_accept, max_energy_error or dense_mass
    (no acceptance, energy error or adapted metric)."""

    def __init__(self, params: Iterable, lr: float, num_data: int = 1, *, prior: Prior | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None):
        super().__init__(params, lr, num_data, prior=prior, temperature=temperature, generator=generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:
        if closure is None:
            raise ValueError("ULA.step needs the closure that computes the full-data loss and calls backward")
        cur = self._current_point(closure)
        h, temp = self.step_size, self.temperature
        start = [p.detach().clone() for p in self._params()]
        with self._restoring_on_error(start, cur):
            self._set(self._langevin_proposal(start, cur.grads))
            new = self._evaluate(closure)
        if new.finite:
            self._finish(new)
        else:
            self._reject(start, cur)
        self.stats = {"lp": -self._current.potential / temp, "step_size": h, "diverging": float(not new.finite),
                      "n_steps": 1.0, "grad_evals": float(self.num_data)}
        return torch.tensor(self._current.potential)

    def adapt(self, on: bool = True, num_warmup: int | None = None) -> None:
        if on:
            raise ValueError("ULA has no acceptance rate to adapt its step size to; use MALA or HMC for warmup")

