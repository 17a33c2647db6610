"""The plain minibatch estimate (SGLD's): N·∇(batch mean NLL)."""

from __future__ import annotations

from .base import Estimator, batch_sum, grad_or_zeros
from .noise import sampling_variance

__all__ = ["Minibatch"]


class Minibatch(Estimator):
    """v = (N/B)·Σ_{i∈S} ∇ℓ_i(θ): unbiased, with variance N²/B·(1 − B/N)·tr Cov(∇ℓ_i).

    ``engine=`` (optional) gives the ``noise_var`` diagnostic from the batch's per-example gradients.
    """

    def __init__(self, engine=None):
        self.engine = engine

    def estimate(self, indices, closure):
        b = None if indices is None else int(indices.numel())
        info = {"grad_evals": b}
        self._check_due = self.spot_check_due()
        reps = self._per_example()
        if reps is not None:
            size = next((r.batch_size for r in reps if r is not None), 0)
            sums = [None if r is None else batch_sum(grad_or_zeros(p), size, self.loss_reduction)
                    for p, r in zip(self.params, reps)]
            info["noise_var"] = sampling_variance(reps, sums, self.num_data)
        scale = self._scale(b)
        for p in self.params:
            grad_or_zeros(p).mul_(scale)
        return info
