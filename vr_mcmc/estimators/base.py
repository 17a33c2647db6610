"""What every gradient estimator shares: binding to a sampler's parameters and the batch sums."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..per_example import PerExampleError, PerExampleGradient
from ..per_example.consistency import SPOT_CHECK_EVERY, SPOT_CHECK_FIRST

__all__ = ["SPOT_CHECK_EVERY", "SPOT_CHECK_FIRST", "Estimator", "batch_sum", "grad_or_zeros"]



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
    _check_due = True  # whether this step runs the spot checks (set by estimate() from spot_check_due())

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

    def spot_check_due(self) -> bool:
        """Counts a step; whether it runs the spot checks: the engine's consistency check (Σ_i g_i against the
        backward's gradient) and SAGA's check that ``.grad`` is the batch's own gradient.

        They run on the first ``SPOT_CHECK_FIRST`` (8) steps of the estimator, then on every
        ``SPOT_CHECK_EVERY``-th (64th): on a small model, checking every step costs more than the step itself
        (0.6 ms against an SGLD step of 0.5 ms on the 2,410-parameter demo MLP). What this still detects: a
        defect of the model or of the loop (a parameter used outside its module's forward, a prior folded into
        the loss, a forgotten ``zero_grad()``) is there on every batch, so it raises on the first step, before
        any draw; one that comes and goes with the data (a branch that only some batches take) raises within
        64 steps of its first occurrence if it recurs on a fraction q of the batches, with probability
        1 − (1 − q)^k after k checked steps. A chain that must check every step: ``estimator.spot_check_every
        = 1``.
        """
        self._spot_steps = getattr(self, "_spot_steps", 0) + 1
        every = getattr(self, "spot_check_every", SPOT_CHECK_EVERY)
        return self._spot_steps <= SPOT_CHECK_FIRST or self._spot_steps % every == 0

    def _collect(self, check_due: bool) -> dict[str, PerExampleGradient]:
        """The engine's per-example gradients of the last batch; its consistency check only if ``check_due``."""
        return self.engine.collect(check=self.engine.check and check_due)

    def _per_example(self, required: bool = False) -> list[PerExampleGradient | None] | None:
        """The engine's per-example gradients of the last batch, aligned with ``self.params`` (None for
        parameters outside the engine's model); None without an engine. Unless ``required``, an engine
        that cannot give them costs the diagnostic (a one-time warning), never the step."""
        if self.engine is None or not (self.diagnose or required):
            return None
        try:
            reps = self._collect(self._check_due)
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
