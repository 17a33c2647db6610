"""Plain log densities as closures, for sampling without an nn.Module (posteriordb-style models)."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch

__all__ = ["log_density_closure"]


def _compiled_value_and_grad(log_density: Callable[..., torch.Tensor], as_dict: bool) -> Callable:
    """torch.compile of θ -> (∇U(θ), U(θ)), U = −log_density, by ``torch.func.grad_and_value``.

    The compiled function gets a code object of its own: torch.compile caches compilations per code object and falls
    back to eager after a few recompilations, which one code object shared by every closure would reach after ~8
    densities.
    """

    def potential(theta):
        lp = log_density(**theta) if as_dict else log_density(theta)
        if not isinstance(lp, torch.Tensor) or lp.numel() != 1:
            raise TypeError(f"log_density must return a one-element tensor, got {type(lp).__name__}")
        return -lp.reshape(())

    def value_and_grad(theta):
        return torch.func.grad_and_value(potential)(theta)

    fresh = types.FunctionType(value_and_grad.__code__.replace(), value_and_grad.__globals__, value_and_grad.__name__,
                               value_and_grad.__defaults__, value_and_grad.__closure__)
    return torch.compile(fresh)


def log_density_closure(
    log_density: Callable[..., torch.Tensor],
    params: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    compile: bool = False,
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

    ``compile=True`` computes U and ∇U by ``torch.compile(torch.func.grad_and_value(...))`` instead of eager autograd
    and adds ∇U to the params' ``.grad`` as ``backward`` would. For small models the gradient is then several times
    cheaper, since eager PyTorch spends most of its time per operation. Each such closure compiles at its first call
    (seconds), so reuse one closure (and its parameter tensor) rather than making many. ``log_density`` must be
    traceable by torch.compile (pure tensor code; graph breaks still work, but cost speed).
    """
    tensors = list(params.values()) if isinstance(params, Mapping) else [params]
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.requires_grad or not t.is_leaf:
            raise TypeError("params must be leaf tensors with requires_grad=True, e.g. "
                            "torch.zeros(d, requires_grad=True)")

    if compile:
        as_dict = isinstance(params, Mapping)
        value_and_grad = _compiled_value_and_grad(log_density, as_dict)
        if as_dict:
            names = list(params)

            def compiled_closure() -> torch.Tensor:
                grads, potential = value_and_grad({k: params[k].detach() for k in names})
                for k in names:
                    _add_grad(params[k], grads[k])
                return potential.detach()
        else:
            theta = params

            def compiled_closure() -> torch.Tensor:
                grad, potential = value_and_grad(theta.detach())
                _add_grad(theta, grad)
                return potential.detach()

        return compiled_closure

    def closure() -> torch.Tensor:
        lp = log_density(**params) if isinstance(params, Mapping) else log_density(params)
        if not isinstance(lp, torch.Tensor) or lp.numel() != 1:
            raise TypeError(f"log_density must return a one-element tensor, got {type(lp).__name__}")
        potential = -lp.reshape(())
        potential.backward()
        return potential.detach()

    return closure


def _add_grad(t: torch.Tensor, g: torch.Tensor) -> None:
    """``t.grad += g`` as backward accumulates (``t.grad = g`` when there is none)."""
    if t.grad is None:
        t.grad = g.detach()
    else:
        t.grad.add_(g)
