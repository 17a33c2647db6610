"""What every gradient estimator shares: binding to a sampler's parameters and the batch sums."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

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
    """

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
