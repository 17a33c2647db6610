"""The plain minibatch estimate (SGLD's): N·∇(batch mean NLL)."""

from __future__ import annotations

from .base import Estimator, grad_or_zeros

__all__ = ["Minibatch"]


class Minibatch(Estimator):
    """v = (N/B)·Σ_{i∈S} ∇ℓ_i(θ): unbiased, with variance growing like N²/B."""

    def estimate(self, indices, closure):
        b = None if indices is None else int(indices.numel())
        scale = self._scale(b)
        for p in self.params:
            grad_or_zeros(p).mul_(scale)
        return {"grad_evals": b}
