"""The metric of the closure-driven samplers: the inverse mass matrix M⁻¹ (preconditioner), diagonal or dense.

One place for its algebra (M⁻¹v, vᵀM⁻¹v, vᵀMv, draws of N(0, M⁻¹) and N(0, M)) that ULA, MALA,
HMC (and a future NUTS) share. A diagonal M⁻¹ lives with the optimizer's state, one tensor per
parameter (``state[p]["inv_mass"]``, shaped like ``p``, ones until set or adapted); a dense one
is Σ over the flattened parameters (float64, factored once as Σ = LLᵀ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Metric"]

Tensors = list[torch.Tensor]


def flatten(tensors: Tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Tensors) -> Tensors:
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class Metric:
    """M⁻¹ for the parameters ``params()``: diagonal (in ``state_of(p)["inv_mass"]``, the optimizer's
    per-parameter state) or, with ``dense``, Σ over the flattened parameters (``inv_mass_dense``;
    None means I). ``noise(like)`` draws ξ ~ N(0, I) shaped like a tensor (the sampler's generator)."""

    def __init__(self, state_of: Callable[[torch.Tensor], dict[str, Any]], params: Callable[[], Tensors],
                 noise: Callable[[torch.Tensor], torch.Tensor], dense: bool = False):
        self._state_of, self._params, self._noise = state_of, params, noise
        self.dense = bool(dense)
        self._inv_mass_dense: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None

    @property
    def inv_mass_dense(self) -> torch.Tensor | None:
        return self._inv_mass_dense

    @inv_mass_dense.setter
    def inv_mass_dense(self, value: torch.Tensor | None) -> None:
        self._inv_mass_dense, self._chol = value, None

    def diagonal(self) -> Tensors:
        """The diagonal M⁻¹, one tensor per parameter (created at ones)."""
        out = []
        for p in self._params():
            state = self._state_of(p)
            if "inv_mass" not in state:
                state["inv_mass"] = torch.ones_like(p)
            out.append(state["inv_mass"])
        return out

    def _factor(self, like: Tensors) -> torch.Tensor | None:
        """L with Σ = LLᵀ in ``like``'s dtype, or None for a diagonal metric."""
        if not self.dense or self._inv_mass_dense is None:
            return None
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self._inv_mass_dense)
        return self._chol.to(like[0].dtype)

    def times_inv_mass(self, vs: Tensors) -> Tensors:
        """M⁻¹v."""
        chol = self._factor(vs)
        if chol is None:
            return [w * v for w, v in zip(self.diagonal(), vs)]
        return unflatten(chol @ (chol.T @ flatten(vs)), vs)

    def quad_inv_mass(self, vs: Tensors, diagonal: Tensors | None = None) -> float:
        """vᵀM⁻¹v (``diagonal``: `diagonal()`, when the caller has it)."""
        chol = self._factor(vs)
        if chol is None:
            diagonal = self.diagonal() if diagonal is None else diagonal
            if len(vs) == 1 and vs[0].dim() == 1:  # one flat parameter (a log density's θ): two ops
                return torch.dot(diagonal[0], vs[0].square()).item()
            return sum(float((w * v * v).sum()) for w, v in zip(diagonal, vs))
        return float((chol.T @ flatten(vs)).square().sum())

    def quad_mass(self, vs: Tensors) -> float:
        """vᵀMv."""
        chol = self._factor(vs)
        if chol is None:
            return sum(float((v * v / w).sum()) for w, v in zip(self.diagonal(), vs))
        return float(torch.linalg.solve_triangular(chol, flatten(vs)[:, None], upper=False).square().sum())

    def sample_inv_mass(self, like: Tensors) -> Tensors:
        """A draw of N(0, M⁻¹) (the Langevin noise)."""
        xi = [self._noise(x) for x in like]
        chol = self._factor(like)
        if chol is None:
            return [w.sqrt() * e for w, e in zip(self.diagonal(), xi)]
        return unflatten(chol @ flatten(xi), like)

    def sample_mass(self, like: Tensors) -> Tensors:
        """A draw of N(0, M) (HMC's momentum)."""
        xi = [self._noise(x) for x in like]
        chol = self._factor(like)
        if chol is None:
            return [e.div_(w.sqrt()) for w, e in zip(self.diagonal(), xi)]
        r = torch.linalg.solve_triangular(chol.T, flatten(xi)[:, None], upper=True)[:, 0]
        return [t.clone() for t in unflatten(r, like)]

    def leapfrog_form(self) -> Tensors | Callable[[Tensors], Tensors]:
        """What `torch_sample.leapfrog` takes as ``inv_mass``: the diagonal, or the map v ↦ M⁻¹v."""
        return self.times_inv_mass if self.dense else self.diagonal()

    def diagonal_flat(self) -> torch.Tensor:
        """M⁻¹'s diagonal over the flattened parameters (float64)."""
        if self.dense:
            if self._inv_mass_dense is None:
                return torch.ones(sum(p.numel() for p in self._params()), dtype=torch.float64)
            return self._inv_mass_dense.diagonal()
        return torch.cat([m.detach().reshape(-1).to(torch.float64) for m in self.diagonal()])

    def set_from_variance(self, var: torch.Tensor) -> None:
        """Set M⁻¹ to an estimated posterior (co)variance over the flattened parameters (float64):
        a matrix for a dense metric, a vector for a diagonal one."""
        if self.dense:
            self.inv_mass_dense = var
            return
        offset = 0
        for m in self.diagonal():
            m.copy_(var[offset : offset + m.numel()].reshape(m.shape).to(m.dtype))
            offset += m.numel()
