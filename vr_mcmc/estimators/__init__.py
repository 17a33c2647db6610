"""Gradient estimators (DESIGN.md §5): each writes an estimate of the data term of ∇U,
Σ_{i=1..N} ∇ℓ_i(θ), into ``p.grad``. Samplers are a Langevin diffusion × one of these."""

from .base import Estimator
from .control_variate import SVRG, ControlVariate
from .minibatch import Minibatch
from .saga import SAG, SAGA

__all__ = ["SAG", "SAGA", "SVRG", "ControlVariate", "Estimator", "Minibatch"]
