"""Stochastic-gradient Langevin dynamics (Welling & Teh 2011)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vr_mcmc.estimators import Estimator

from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["SGLD"]


class SGLD(LangevinSampler):
    """θ ← θ − h·(N·∇(batch mean NLL) + ∇(−log p(θ))) + √(2hT)·ξ.

    ``estimator=`` swaps the plain minibatch estimate for any `vr_mcmc.estimators` one (SAGALD,
    SVRGLD and SGLDCV are this class with theirs). ``temperature=0`` is SGD; ``momentum``/
    ``nesterov`` as in torch.optim.SGD (momentum with T > 0 is SGHMC in Chen et al.'s eq. 15 form; `SGHMC` is
    the dedicated class). ``schedule=``: e.g. `torch_sample.schedules.Cyclical` (cSGLD). See `LangevinSampler`.

    Example::

        sampler = SGLD(model.parameters(), lr=1e-5, num_data=len(dataset), prior=priors.Normal(1.0))
        for idx, x, y in loader:
            sampler.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            sampler.step(indices=idx, loss=loss)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        prior: Prior | None = None,
        temperature: float = 1.0,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        loss_reduction: str = "mean",
        estimator: Estimator | None = None,
        engine: Any = None,
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
        schedule: Any = None,
    ):
        super().__init__(params, lr, num_data, estimator, prior=prior, temperature=temperature, momentum=momentum,
                         nesterov=nesterov, loss_reduction=loss_reduction, engine=engine,
                         generator=generator,
                         max_divergences=max_divergences, schedule=schedule)
