"""The unadjusted Langevin algorithm on the full-data gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .metropolis import MetropolisSampler

__all__ = ["ULA"]


class ULA(MetropolisSampler):
    """θ ← θ − h·M⁻¹∇U(θ) + √(2hT)·M^(−1/2)·ξ with the exact ∇U from the closure (M⁻¹ = I unless
    set in ``state[p]["inv_mass"]``), no Metropolis test (so a
    discretization bias of order h). A step to a non-finite U or ∇U is undone and marked
    ``diverging``. ``stats``: lp, step_size, diverging, n_steps (1), grad_evals (N). Not adapted
    (no acceptance to aim at): ``adapt`` is refused."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:
        if closure is None:
            raise ValueError("ULA.step needs the closure that computes the full-data loss and calls backward")
        cur = self._current_point(closure)
        h, temp = self.step_size, self.temperature
        start = [p.detach().clone() for p in self._params()]
        self._set(self._langevin_proposal(start, cur.grads))
        new = self._evaluate(closure)
        if new.finite:
            self._finish(new)
        else:
            self._set(start)
            self._finish(cur)
        self.stats = {"lp": -self._current.potential / temp, "step_size": h, "diverging": float(not new.finite),
                      "n_steps": 1.0, "grad_evals": float(self.num_data)}
        return torch.tensor(self._current.potential)

    def adapt(self, on: bool = True, num_warmup: int | None = None) -> None:
        if on:
            raise ValueError("ULA has no acceptance rate to adapt its step size to; use MALA or HMC for warmup")
