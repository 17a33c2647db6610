"""The plain base of the full-data samplers driven by a closure (as torch.optim.LBFGS): ULA, and MALA and HMC
through `torch_sample.metropolis.MetropolisSampler`.

Target π(θ) ∝ exp(−U(θ)/T), U(θ) = N·loss(θ) + (−log p(θ)) (see `torch_sample.evaluation`). Every
evaluation is checked: a non-finite U or ∇U at a proposal is a rejection marked ``diverging``
(never an exception), and a rejected proposal restores the parameters together with the cached U
and ∇U of the current state. After each step ``p.grad`` holds ∇U at the current θ. The metric
(M⁻¹) is a `torch_sample.metric.Metric`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim import Optimizer

from ._shared import (
    check_full_precision,
    check_number,
    gaussian_noise,
    restore_generator,
    state_from_plain,
    state_to_plain,
)
from .evaluation import EvaluationCache, Point
from .metric import Metric
from .priors import Prior

__all__ = ["ClosureSampler"]


class ClosureSampler(Optimizer):
    """Base of the closure-driven samplers: ``lr`` is the step size (one for all groups), ``prior``
    may differ per param group, ``temperature`` T, ``generator`` the noise's. It holds the
    parameters, the `Metric` (``metric``; diagonal unless ``dense_mass``) and the `EvaluationCache`
    of the current state; it has no acceptance test and no adaptation (`MetropolisSampler` adds
    them)."""

    adapts_step_size = False  # whether `adapt` tunes the step size (MetropolisSampler)

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int = 1,
        *,
        prior: Prior | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        dense_mass: bool = False,
    ):
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be the number of examples (an integer >= 1; 1 when the closure returns "
                             f"U itself), got {num_data!r}")
        check_number("temperature", temperature, 0.0, strict=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        super().__init__(params, dict(lr=lr, prior=prior))
        if len({g["lr"] for g in self.param_groups}) != 1:
            raise ValueError(f"{type(self).__name__} takes one step size for all parameter groups")
        self.num_data = num_data
        self.temperature = float(temperature)
        self.generator = generator
        check_full_precision(self._params(), type(self).__name__)
        self.dense_mass = bool(dense_mass)
        self.metric = Metric(self._param_state, self._params, self._noise, dense=self.dense_mass)
        self.evaluations = EvaluationCache(self, num_data)
        self.stats: dict[str, float] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        check_number("lr (the step size)", group["lr"], 0.0, strict=True)
        if group["prior"] is not None and not isinstance(group["prior"], Prior):
            raise TypeError(f"prior must be a torch_sample.priors.Prior or None, got {group['prior']!r}")
        super().add_param_group(param_group)

    # -- parameters -------------------------------------------------------------------------------

    @property
    def step_size(self) -> float:
        return float(self.param_groups[0]["lr"])

    def _set_step_size(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = value

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _param_state(self, p: torch.Tensor) -> dict[str, Any]:
        return self.state[p]  # looked up each time: load_state_dict replaces self.state

    def _noise(self, p: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(p, self.generator)

    @property
    def inv_mass_dense(self) -> torch.Tensor | None:
        """The dense M⁻¹ (``dense_mass=True``; None: the identity); settable."""
        return self.metric.inv_mass_dense

    @inv_mass_dense.setter
    def inv_mass_dense(self, value: torch.Tensor | None) -> None:
        self.metric.inv_mass_dense = value

    def _langevin_proposal(self, start: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """θ − h·M⁻¹∇U(θ) + √(2hT)·M^(−1/2)·ξ, the move of ULA and MALA's proposal."""
        h = self.step_size
        scale = math.sqrt(2 * h * self.temperature)
        drift = self.metric.times_inv_mass(grads)
        noise = self.metric.sample_inv_mass(start)
        return [x - h * d + scale * e for x, d, e in zip(start, drift, noise)]

    # -- evaluation -------------------------------------------------------------------------------

    def _evaluate(self, closure: Callable[[], Any], params: list[torch.Tensor] | None = None) -> Point:
        """U, ∇U at the parameters' current values (``params``: `_params()`, when the caller has it)."""
        return self.evaluations.evaluate(closure, self._params() if params is None else params)

    def _current_point(self, closure: Callable[[], Any]) -> Point:
        return self.evaluations.current(closure, self._params())

    @property
    def _current(self) -> Point | None:
        return self.evaluations.point

    @torch.no_grad()
    def _set(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self._params(), values):
            p.copy_(v)

    @contextmanager
    def _restoring_on_error(self, start: list[torch.Tensor], cur: Point) -> Iterator[None]:
        """Any exception raised inside (by the closure, or a KeyboardInterrupt) leaves the sampler at
        ``start`` with ``cur``'s U and ∇U, as a rejection would, and then propagates."""
        try:
            yield
        except BaseException:
            self._set(start)
            self._finish(cur)
            raise

    def _finish(self, point: Point) -> None:
        """Make ``point`` the current state: its gradient in ``.grad``, its versions recorded."""
        self.evaluations.commit(point, self._params())

    def _reject(self, start: list[torch.Tensor], cur: Point) -> None:
        """Back to ``start`` and its evaluation ``cur``."""
        self._set(start)
        self._finish(cur)

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return state_to_plain(super().state_dict(), self.generator)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, generator = state_from_plain(state_dict)
        self._load_extra(state_dict)
        super().load_state_dict(state_dict)
        restore_generator(self.generator, generator)
        self.evaluations.clear()  # re-evaluated at the next step, at the loaded parameters

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Pop and restore what a subclass added to the state dict (before the optimizer's own load)."""
