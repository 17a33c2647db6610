"""SGLD-CV: Langevin dynamics with a control variate at a fixed centre (Baker et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from vr_mcmc.estimators import ControlVariate

from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["SGLDCV"]


class SGLDCV(LangevinSampler):
    """θ ← θ − h·(v + ∇(−log p(θ))) + √(2hT)·ξ with v = μ̂ + (N/B)·Σ_{i∈S}(g_i(θ) − g_i(θ̂)),
    θ̂ = ``centre`` (e.g. a mode found with ``temperature=0`` first; None: the parameters at the
    first step) and μ̂ = Σ_j g_j(θ̂) from one pass over ``loader`` with ``loss_fn(*data)``.

    ``step(closure, indices=idx)`` as for `SVRGLD`: the closure runs at θ and at θ̂.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        loader: Iterable,
        loss_fn: Callable[..., torch.Tensor],
        centre: Iterable[torch.Tensor] | None = None,
        *,
        prior: Prior | None = None,
        temperature: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        loss_reduction: str = "mean",
        engine: Any = None,
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
    ):
        super().__init__(params, lr, num_data, ControlVariate(centre, loader=loader, loss_fn=loss_fn), prior=prior,
                         temperature=temperature, momentum=momentum, nesterov=nesterov, loss_reduction=loss_reduction,
                         engine=engine, generator=generator,
                         max_divergences=max_divergences)
