"""Control-variate estimates around a centre θ̃ with a full gradient there: SGLD-CV and SVRG."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..per_example.representations import combine

# Randomized-autodiff modes (no-ops without randomized layers); vr_mcmc.rad depends on per_example only: no cycle.
from ..rad.context import exact as rad_exact
from ..rad.context import repeat_last_pattern
from .base import Estimator, batch_sum, grad_or_zeros
from .noise import sampling_variance

__all__ = ["SVRG", "ControlVariate"]


class ControlVariate(Estimator):
    """v = μ̃ + (N/B)·Σ_{i∈S}(g_i(θ) − g_i(θ̃)), μ̃ = Σ_{j=1..N} g_j(θ̃), at a fixed centre θ̃ (SGLD-CV).

    ``centre``: tensors in the order of the sampler's parameters (e.g. a mode found by SGD), or
    None for the parameters as they are at the first step. μ̃ comes from one pass over
    ``loader``, which yields ``(idx, *data)`` batches covering the data once (a DataLoader over
    a `vr_mcmc.data.IndexedDataset`); ``loss_fn(*data)`` returns a batch's loss as
    backpropagated in training. Each step calls the step's closure once more, at θ̃, for
    Σ_{i∈S} g_i(θ̃): 2B gradient evaluations a step. ``engine=`` (optional, on the model) gives the
    ``noise_var`` diagnostic from the per-example gradients at θ and θ̃.

    With randomized layers (`vr_mcmc.rad`) the full-gradient pass runs exact and the closure at θ̃
    reuses the random patterns of the closure at θ, so the estimate stays unbiased and its extra
    noise vanishes as θ → θ̃ (derivation in `vr_mcmc.rad`).
    """

    needs_closure = True

    def __init__(
        self,
        centre: Iterable[torch.Tensor] | None = None,
        *,
        loader: Iterable | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        engine: Any = None,
    ):
        self.engine = engine
        if loader is None or loss_fn is None:
            raise ValueError(
                f"{type(self).__name__} needs loader= (yielding (idx, *data) over the whole data set) and loss_fn= "
                "(loss_fn(*data) -> the batch loss) for its full-gradient pass"
            )
        self.loader = loader
        self.loss_fn = loss_fn
        self._given_centre = None if centre is None else [torch.as_tensor(c).detach().clone() for c in centre]
        self.centre: list[torch.Tensor] | None = None
        self.full_grad: list[torch.Tensor] | None = None
        self.steps = 0

    def bind(self, params, num_data, loss_reduction) -> None:
        super().bind(params, num_data, loss_reduction)
        if self._given_centre is not None:
            if len(self._given_centre) != len(self.params) or any(
                c.shape != p.shape for c, p in zip(self._given_centre, self.params)
            ):
                raise ValueError(
                    "centre must hold one tensor per sampler parameter, in order and of the same shapes; got shapes "
                    f"{[tuple(c.shape) for c in self._given_centre]} for {[tuple(p.shape) for p in self.params]}"
                )
            self._given_centre = [c.to(p.device, p.dtype) for c, p in zip(self._given_centre, self.params)]

    def _refresh_due(self) -> bool:
        return self.full_grad is None

    def _new_centre(self) -> list[torch.Tensor]:
        if self._given_centre is not None:
            return self._given_centre
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _swap(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        saved = [p.detach().clone() for p in self.params]
        torch._foreach_copy_(self.params, list(values))
        return saved

    def full_gradient(self) -> list[torch.Tensor]:
        """Σ_{j=1..N} g_j at the current parameters, by one pass over ``loader`` (``.grad`` untouched).

        Randomized layers (`vr_mcmc.rad`) run exact here: μ̃ is the exact full gradient.
        """
        total, count = self._summed_pass()
        if count != self.num_data:
            raise ValueError(
                f"the full-gradient pass over loader visited {count} examples but num_data={self.num_data}: the "
                "loader must cover the whole data set once (no drop_last, no sampling with replacement)"
            )
        return total

    def _summed_pass(self) -> tuple[list[torch.Tensor], int]:
        """(Σ g_j over the examples ``loader`` yields, their number): the pass `full_gradient` checks and a
        data-parallel rank all-reduces (`vr_mcmc.distributed`)."""
        total = [torch.zeros_like(p) for p in self.params]
        count = 0
        for batch in self.loader:
            idx, *data = batch
            b = torch.as_tensor(idx).numel()
            with torch.enable_grad(), rad_exact():
                loss = self.loss_fn(*data)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(batch_sum(g, b, self.loss_reduction))
            count += b
        return total, count

    def estimate(self, indices, closure):
        b = None if indices is None else int(indices.numel())
        info: dict[str, Any] = {"refreshed": False}
        evals = 0
        self._check_due = self.spot_check_due()
        here_reps = self._per_example()  # before the full-gradient pass replaces the engine's batch
        if self._refresh_due():
            self.centre = self._new_centre()
            at_centre = all(torch.equal(c, p) for c, p in zip(self.centre, self.params))
            saved = None if at_centre else self._swap(self.centre)
            try:
                self.full_grad = self.full_gradient()
            finally:
                if saved is not None:
                    self._swap(saved)
            evals += self.num_data
            info["refreshed"] = True
            if at_centre:  # θ = θ̃: the correction vanishes, v = μ̃ (no noise)
                for p, mu in zip(self.params, self.full_grad):
                    p.grad = mu.clone()
                self.steps += 1
                info["grad_evals"] = None if b is None else b + evals
                if here_reps is not None:
                    info["noise_var"] = torch.tensor([0.0 if r is not None else float("nan") for r in here_reps],
                                                     dtype=torch.float64)
                return info
        scale = self._scale(b)
        here = [grad_or_zeros(p).clone() for p in self.params]
        saved = self._swap(self.centre)
        try:
            with torch.enable_grad(), repeat_last_pattern():  # the random patterns of the closure at θ
                closure()
            centre_reps = None if here_reps is None else self._per_example()
        finally:
            self._swap(saved)
        if here_reps is not None and centre_reps is not None:
            diffs = [None if a is None or c is None else combine([a, c * -1.0]) for a, c in zip(here_reps, centre_reps)]
            info["noise_var"] = sampling_variance(diffs, [None] * len(diffs), self.num_data)
        # μ̃ + (g(θ) − g(θ̃))·scale for all parameters at once (the same arithmetic per element)
        at_centre = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        moved = torch._foreach_sub(here, at_centre)
        torch._foreach_mul_(moved, scale)
        for p, v in zip(self.params, torch._foreach_add(self.full_grad, moved)):
            p.grad = v
        self.steps += 1
        info["grad_evals"] = None if b is None else 2 * b + evals
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "centre": None if self.centre is None else [c.clone() for c in self.centre],
            "full_grad": None if self.full_grad is None else [g.clone() for g in self.full_grad],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def on_params(ts):
            return None if ts is None else [t.to(p.device, p.dtype).clone() for t, p in zip(ts, self.params)]

        self.centre = on_params(state["centre"])
        self.full_grad = on_params(state["full_grad"])
        self.steps = int(state["steps"])


class SVRG(ControlVariate):
    """The control variate with its centre moved to the current θ every ``snapshot_every`` steps
    (one full-gradient pass each time): v = μ̃ + (N/B)·Σ_{i∈S}(g_i(θ) − g_i(θ̃))."""

    def __init__(self, snapshot_every: int, *, loader: Iterable | None = None,
                 loss_fn: Callable[..., torch.Tensor] | None = None, engine: Any = None):
        if not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive integer (steps between snapshots), got "
                             f"{snapshot_every!r}")
        super().__init__(None, loader=loader, loss_fn=loss_fn, engine=engine)
        self.snapshot_every = snapshot_every

    def _refresh_due(self) -> bool:
        return self.full_grad is None or self.steps % self.snapshot_every == 0

    def _new_centre(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def __repr__(self) -> str:
        return f"SVRG(snapshot_every={self.snapshot_every})"
