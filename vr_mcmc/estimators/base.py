"""What every gradient estimator shares: binding to a sampler's parameters and the batch sums."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..per_example import PerExampleError, PerExampleGradient

__all__ = ["Estimator", "batch_sum", "grad_or_zeros"]


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, created as zeros when the parameter took no part in the loss."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def batch_sum(grad: torch.Tensor, batch_size: int, loss_reduction: str) -> torch.Tensor:
    """Σ_{i∈S} ∇ℓ_i from the gradient of the batch loss (mean: B·grad; sum: grad)."""
    return grad * batch_size if loss_reduction == "mean" else grad


class Estimator:
    """Writes an estimate of the data term of ∇U, Σ_{i=1..N} ∇ℓ_i(θ), into ``p.grad``.

    On entry ``p.grad`` holds the gradient of the minibatch loss (the batch *mean* NLL, or the
    sum with ``loss_reduction="sum"``) at the current θ; on exit it holds the estimate. Samplers
    call `bind` once, then `estimate` each step.

    ``engine``: a `vr_mcmc.per_example.PerExampleGradients` on the model, or None. Table estimators
    (SAGA) need it; for the others it is optional and gives the ``noise_var`` entry of the info:
    per parameter, the estimated variance of the estimate's noise (`vr_mcmc.estimators.noise`),
    from which samplers report ``noise_ratio``.
    """

    engine = None
    diagnose = True  # the sampler's choice, per step, of whether to measure noise_var

    needs_indices: bool = False  # step(indices=...) is required
    needs_closure: bool = False  # step(closure) is required
    unbiased: bool = True  # E[estimate] = Σ_i ∇ℓ_i(θ) over the uniform choice of the batch

    def bind(self, params: Sequence[torch.Tensor], num_data: int, loss_reduction: str) -> None:
        self.params = list(params)
        self.num_data = num_data
        self.loss_reduction = loss_reduction

    def estimate(self, indices: torch.Tensor | None, closure: Callable[[], Any] | None) -> dict[str, Any]:
        """Overwrite ``p.grad`` with the estimate; return per-step info (``grad_evals``, ...)."""
        raise NotImplementedError

    def _per_example(self, required: bool = False) -> list[PerExampleGradient | None] | None:
        """The engine's per-example gradients of the last batch, aligned with ``self.params`` (None for
        parameters outside the engine's model); None without an engine. Unless ``required``, an engine
        that cannot give them costs the diagnostic (a one-time warning), never the step."""
        if self.engine is None or not (self.diagnose or required):
            return None
        try:
            reps = self.engine.collect()
        except PerExampleError as exc:
            if required:
                raise
            if not getattr(self, "_warned_diagnostic", False):
                self._warned_diagnostic = True
                warnings.warn(f"no per-example gradients for the noise_ratio diagnostic ({exc}); it reads NaN",
                              stacklevel=4)
            return None
        names = {id(p): n for n, p in self.engine.parameter_names.items()}
        return [reps.get(names.get(id(p), "")) for p in self.params]

    def _scale(self, batch_size: int | None) -> float:
        """Factor turning the batch loss's gradient into an estimate of the full sum."""
        if self.loss_reduction == "mean":
            return float(self.num_data)
        if batch_size is None:
            raise ValueError("with loss_reduction='sum' the sampler needs the batch's indices: step(indices=idx)")
        return self.num_data / batch_size

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
