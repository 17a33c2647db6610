"""SVRG-LD: Langevin dynamics with the SVRG estimate (Dubey et al. 2016)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from vr_mcmc.estimators import SVRG

from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["SVRGLD"]


class SVRGLD(LangevinSampler):
    """θ ← θ − h·(v + ∇(−log p(θ))) + √(2hT)·ξ with v = μ̃ + (N/B)·Σ_{i∈S}(g_i(θ) − g_i(θ̃)),
    the snapshot θ̃ and μ̃ = Σ_j g_j(θ̃) renewed every ``snapshot_every`` steps by one pass over
    ``loader`` (``(idx, *data)`` batches covering the data once) with ``loss_fn(*data)``.

    ``step(closure, indices=idx)``: the closure zeroes the gradients, computes this batch's loss,
    backpropagates and returns it; it runs at θ and again at θ̃. ``temperature=0`` is SVRG.

    Example::

        sampler = SVRGLD(model.parameters(), lr=1e-4, num_data=N, snapshot_every=len(loader),
                         loader=full_loader, loss_fn=lambda x, y: F.cross_entropy(model(x), y))
        for idx, x, y in loader:
            def closure():
                sampler.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            sampler.step(closure, indices=idx)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        snapshot_every: int,
        loader: Iterable,
        loss_fn: Callable[..., torch.Tensor],
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
        super().__init__(params, lr, num_data, SVRG(snapshot_every, loader=loader, loss_fn=loss_fn), prior=prior,
                         temperature=temperature, momentum=momentum, nesterov=nesterov, loss_reduction=loss_reduction,
                         engine=engine, generator=generator,
                         max_divergences=max_divergences)
