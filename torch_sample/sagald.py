"""SAGA-LD: Langevin dynamics with the SAGA estimate (Dubey et al. 2016), on a compact table."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vr_mcmc.estimators import SAGA
from vr_mcmc.per_example import PerExampleGradients
from vr_mcmc.storage import GradientTable

from .langevin import LangevinSampler
from .priors import Prior

__all__ = ["SAGALD"]


class SAGALD(LangevinSampler):
    """θ ← θ − h·(v + ∇(−log p(θ))) + √(2hT)·ξ with the SAGA estimate
    v = Σ_j h_j + (N/B)·Σ_{i∈S}(g_i − h_i) from a table of stored per-example gradients.

    ``engine``: a `vr_mcmc.per_example.PerExampleGradients` on the model, built before the first
    forward. ``table``: a `GradientTable`, or None to build one with ``policy`` ("auto": exact and
    compact; "dense", "factored", "lowrank" with ``rank``), ``block_size`` (partition sampling:
    batches from a `vr_mcmc.data.BlockSampler` with the same ``seed``) and storage ``table_dtype``.
    ``temperature=0`` is the SAGA optimizer; ``momentum``/``nesterov`` as in torch.optim.SGD.
    ``initialize(loader, loss_fn)`` fills the table by one pass; otherwise rows start at zero.

    Example::

        engine = PerExampleGradients(model)
        sampler = SAGALD(model.parameters(), lr=1e-4, num_data=N, engine=engine)
        for idx, x, y in loader:                      # over vr_mcmc.data.IndexedDataset
            sampler.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sampler.step(indices=idx)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        engine: PerExampleGradients,
        *,
        table: GradientTable | None = None,
        policy: str = "auto",
        rank: int | None = None,
        block_size: int | None = None,
        table_dtype: torch.dtype | None = None,
        seed: int = 0,
        prior: Prior | None = None,
        temperature: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
    ):
        if not isinstance(engine, PerExampleGradients):
            raise TypeError("SAGALD needs engine=vr_mcmc.per_example.PerExampleGradients(model), got "
                            f"{type(engine).__name__}")
        estimator = SAGA(table, engine, policy=policy, rank=rank, block_size=block_size, dtype=table_dtype, seed=seed)
        super().__init__(params, lr, num_data, estimator, prior=prior, temperature=temperature, momentum=momentum,
                         nesterov=nesterov, loss_reduction=loss_reduction, generator=generator,
                         max_divergences=max_divergences)

    @property
    def table(self) -> GradientTable:
        return self.estimator.table
