"""Plain log densities as closures, for sampling without an nn.Module (posteriordb-style models)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["log_density_closure"]


def log_density_closure(
    log_density: Callable[..., torch.Tensor],
    params: torch.Tensor | Mapping[str, torch.Tensor],
) -> Callable[[], torch.Tensor]:
    """The closure for `MALA`/`HMC`/`ULA` (``num_data=1``) that targets exp(log_density):
    it returns U = −log_density(params) after ``U.backward()``.

    ``params``: one tensor (``log_density(theta)``) or a dict of tensors (``log_density(**params)``),
    each a leaf with ``requires_grad=True``; give the sampler the same tensors::

        theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        sampler = torch_sample.HMC([theta], lr=0.1, num_leapfrog=10)
        closure = torch_sample.log_density_closure(lambda t: -0.5 * (t ** 2).sum(), theta)
        for _ in range(1000):
            sampler.step(closure)
    """
    tensors = list(params.values()) if isinstance(params, Mapping) else [params]
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.requires_grad or not t.is_leaf:
            raise TypeError("params must be leaf tensors with requires_grad=True, e.g. "
                            "torch.zeros(d, requires_grad=True)")

    def closure() -> torch.Tensor:
        lp = log_density(**params) if isinstance(params, Mapping) else log_density(params)
        if not isinstance(lp, torch.Tensor) or lp.numel() != 1:
            raise TypeError(f"log_density must return a one-element tensor, got {type(lp).__name__}")
        potential = -lp.reshape(())
        potential.backward()
        return potential.detach()

    return closure
