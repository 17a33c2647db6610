"""The base of the Metropolis-adjusted closure samplers (MALA, HMC): acceptance test and warmup adaptation.

On top of `torch_sample.closure.ClosureSampler` (parameters, metric, evaluation cache, state): the
accept/reject step on a float64 uniform, divergences above ``max_energy_error``, and the warmup:
dual averaging of the step size toward ``target_accept`` and, for samplers with a mass matrix,
Stan's windowed estimate of the metric (diagonal, or dense with ``dense_mass``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ._shared import check_number, check_probability
from .adaptation import DualAveraging, WelfordDense, WelfordDiagonal, terminal_start, warmup_windows
from .closure import ClosureSampler
from .evaluation import DOMAIN_ERRORS, Point
from .priors import Prior

__all__ = ["DOMAIN_ERRORS", "STEP_SIZE_TUNINGS", "MetropolisSampler"]

STEP_SIZE_TUNINGS = ("stan", "calm")
STAN_TERMINAL_BUFFER = 50  # Stan's term_buffer


class MetropolisSampler(ClosureSampler):
    """Base of the Metropolis-adjusted closure samplers. ``lr`` is the step size (one for all groups);
    ``prior`` may differ per param group; ``target_accept`` is the acceptance the step-size
    adaptation aims at; a proposal whose energy error exceeds ``max_energy_error`` is a divergence.

    ``step_size_tuning`` chooses how the warmup ends (see `adapt`): ``"stan"`` is Stan's schedule, a
    50-step terminal buffer of dual averaging restarted after the last metric update, its averaged
    step handed over; the acceptance realized afterwards then runs above the target (0.84–0.90 for
    0.8 on eight schools), smaller steps that avoid divergences where Stan avoids them. ``"calm"``
    fine-tunes the averaged step over a longer terminal phase with a 10× smaller gain
    (`DualAveraging.restart_calm`), so that the acceptance at the final step *is* the target: larger
    steps, fewer gradients per draw, but a few divergences where Stan has none (eight schools
    non-centred: 3–6 in 4,000 NUTS draws, 0–2 with ``"stan"``). Default: ``"stan"`` for NUTS,
    ``"calm"`` for HMC and MALA, whose fixed trajectories and acceptance-rate checks were tuned on it.
    """

    default_target_accept = 0.8
    default_step_size_tuning = "calm"
    adapts_mass = False
    adapts_step_size = True  # `adapt` tunes the step size to ``target_accept``

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int = 1,
        *,
        prior: Prior | None = None,
        temperature: float = 1.0,
        target_accept: float | None = None,
        max_energy_error: float = 1000.0,
        dense_mass: bool = False,
        generator: torch.Generator | None = None,
        step_size_tuning: str | None = None,
    ):
        super().__init__(params, lr, num_data, prior=prior, temperature=temperature, generator=generator,
                         dense_mass=dense_mass)
        self.max_energy_error = check_number("max_energy_error", max_energy_error, 0.0, strict=True)
        if target_accept is not None:
            check_probability("target_accept", target_accept)
        tuning = self.default_step_size_tuning if step_size_tuning is None else step_size_tuning
        if tuning not in STEP_SIZE_TUNINGS:
            raise ValueError(f"step_size_tuning must be one of {STEP_SIZE_TUNINGS}, got {step_size_tuning!r}")
        self.step_size_tuning = tuning
        self.dual = DualAveraging(float(lr), target_accept or self.default_target_accept)
        self.welford = WelfordDense() if self.dense_mass else WelfordDiagonal()
        self.adapting = False
        self._warmup_step = 0
        self._windows: list[tuple[int, int]] = []
        self._terminal_start: int | None = None

    def _accept_or_reject(self, accept_prob: float, diverging: bool, new: Point, start: list[torch.Tensor],
                          cur: Point) -> bool:
        """The Metropolis test: accept ``new`` if u < α for u ~ U(0, 1) in float64 (no log of u, which is
        exactly 0 with probability 2⁻²⁴ in float32), else go back to ``start``. Returns whether accepted."""
        u = torch.rand((), dtype=torch.float64, generator=self.generator,
                       device=self.generator.device if self.generator else None)
        if not diverging and u.item() < accept_prob:
            self._finish(new)
            return True
        self._reject(start, cur)
        return False

    # -- adaptation -------------------------------------------------------------------------------

    def adapt(self, on: bool = True, num_warmup: int | None = None) -> None:
        """Start (``on=True``) or end warmup adaptation. During it the step size follows dual averaging
        toward ``target_accept``. Given ``num_warmup`` (the planned warmup steps), samplers with a
        mass matrix (HMC, NUTS, MALA) also estimate one in Stan's windows, dual averaging restarting
        after each update. With ``step_size_tuning="stan"`` the last 50 steps (10% of a short warmup)
        are one more such phase, as in Stan; with ``"calm"`` the last max(100, 20%) steps fine-tune
        the step size from the averaged one with a small gain, so that the acceptance at the final
        step size is the target (see `DualAveraging.restart_calm`). Ending it sets the step size to
        the dual-averaged one."""
        if on:
            stan = self.step_size_tuning == "stan"
            self.adapting = True
            self._warmup_step = 0
            term_buffer = STAN_TERMINAL_BUFFER if stan else None
            self._windows = (warmup_windows(num_warmup, term_buffer=term_buffer)
                             if (num_warmup and self.adapts_mass) else [])
            self._terminal_start = (terminal_start(num_warmup, self._windows) if num_warmup and not stan
                                    else None)
            self.welford.reset()
            self.dual.restart(self.step_size)
        elif self.adapting:
            self.adapting = False
            self._set_step_size(self.dual.final_step_size)

    def _adapt_after_step(self, accept_prob: float) -> None:
        if not self.adapting:
            return
        self._warmup_step += 1
        self._set_step_size(self.dual.update(accept_prob))
        t = self._warmup_step
        for start, end in self._windows:
            if start <= t <= end:
                self.welford.update(torch.cat([p.detach().reshape(-1) for p in self._params()]))
                if t == end:
                    self.metric.set_from_variance(self.welford.variance(fallback=self.metric.diagonal_flat()))
                    self.welford.reset()
                    if t != self._terminal_start:
                        self.dual.restart(self.step_size)
        if t == self._terminal_start:
            step = self.dual.final_step_size
            self.dual.restart_calm(step)
            self._set_step_size(step)

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["adaptation"] = {"dual": self.dual.state_dict(), "welford": self.welford.state_dict(),
                               "adapting": self.adapting, "warmup_step": self._warmup_step,
                               "windows": list(self._windows),
                               "terminal_start": self._terminal_start, "inv_mass_dense": self.metric.inv_mass_dense}
        return state

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        adaptation = state_dict.pop("adaptation", None)
        if adaptation is not None:
            self.dual.load_state_dict(adaptation["dual"])
            self.welford.load_state_dict(adaptation["welford"])
            self.adapting = adaptation["adapting"]
            self._warmup_step = adaptation["warmup_step"]
            self._windows = [tuple(w) for w in adaptation["windows"]]
            self._terminal_start = adaptation.get("terminal_start")
            self.metric.inv_mass_dense = adaptation.get("inv_mass_dense")
