"""Priors p(θ) for the samplers' ``prior=`` option (DESIGN.md §2).

A prior is applied elementwise and independently to every parameter of a param group; it adds
∇(−log p(θ)) to the estimate of ∇U and contributes ``log_prob`` to the reported ``lp``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Flat", "Laplace", "Normal", "Prior", "prior_from_dict"]


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


class Prior:
    """An elementwise, independent prior over a parameter tensor."""

    def log_prob(self, param: torch.Tensor) -> torch.Tensor:
        """log p(θ) summed over the tensor's elements (normalized)."""
        raise NotImplementedError

    def add_grad_(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """``grad += ∇_θ(−log p(θ))``, in place."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for ``state_dict``, loadable with ``torch.load(weights_only=True)``)."""
        return {"type": type(self).__name__, **vars(self)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class Normal(Prior):
    """θ ~ N(mean, std²) elementwise: −log p = (θ − mean)²/(2 std²) + const (L2 weight decay 1/std²)."""

    def __init__(self, std: float = 1.0, mean: float = 0.0):
        self.std = _positive("Normal prior std", std)
        self.mean = float(mean)

    def log_prob(self, param):
        z = (param - self.mean) / self.std
        return -0.5 * (z * z).sum() - param.numel() * (math.log(self.std) + 0.5 * math.log(2 * math.pi))

    def add_grad_(self, param, grad):
        grad.add_(param - self.mean if self.mean else param, alpha=1.0 / self.std**2)


class Laplace(Prior):
    """θ ~ Laplace(loc, scale) elementwise: −log p = |θ − loc|/scale + const (subgradient 0 at loc)."""

    def __init__(self, scale: float = 1.0, loc: float = 0.0):
        self.scale = _positive("Laplace prior scale", scale)
        self.loc = float(loc)

    def log_prob(self, param):
        return -(param - self.loc).abs().sum() / self.scale - param.numel() * math.log(2 * self.scale)

    def add_grad_(self, param, grad):
        grad.add_(torch.sign(param - self.loc), alpha=1.0 / self.scale)


class Flat(Prior):
    """The improper flat prior: log p = 0, no gradient."""

    def log_prob(self, param):
        return param.new_zeros((), dtype=torch.promote_types(param.dtype, torch.float32))

    def add_grad_(self, param, grad):
        pass


_PRIORS = {cls.__name__: cls for cls in (Normal, Laplace, Flat)}


def prior_from_dict(state: dict[str, Any]) -> Prior:
    """Rebuild a prior saved by `Prior.to_dict`."""
    state = dict(state)
    kind = state.pop("type")
    if kind not in _PRIORS:
        raise ValueError(f"unknown prior {kind!r}; known: {sorted(_PRIORS)}")
    return _PRIORS[kind](**state)
