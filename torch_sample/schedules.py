"""Schedules of the step size and temperature for the stochastic-gradient samplers (DESIGN.md §11).

A schedule is passed as ``schedule=`` to any `torch_sample.LangevinSampler` (SGLD, SGHMC, PSGLD, SGNHT; or set
``sampler.schedule = ...`` on SAGALD/SVRGLD/SGLDCV). Called with the 0-based index k of the step being made, it
returns (step-size factor, temperature factor, sampling phase): the sampler steps with ``lr·factor`` and
``temperature·factor`` and reports ``stats["step_size"]``, ``stats["temperature"]`` and
``stats["sampling_phase"]`` (1.0 or 0.0). `vr_mcmc.sample` keeps only the draws of steps whose
``sampling_phase`` is 1 (see `vr_mcmc.chains`). It composes with ``torch.optim.lr_scheduler``, which sets ``lr``.
"""

from __future__ import annotations

import math

__all__ = ["Cyclical"]


class Cyclical:
    """Cyclical SG-MCMC (Zhang, Li, Zhang, Chen & Wilson 2020, cSGLD/cSGHMC).

    ``total_steps`` K split into ``num_cycles`` M cycles of L = ⌈K/M⌉ steps; at step k (0-based) with
    r = (k mod L)/L the step size is h·(cos(π·r) + 1)/2 (h = the sampler's ``lr``), and the step belongs to
    the exploration phase (temperature 0: an optimizer's step toward a new mode) while r < ``exploration``
    (β), to the sampling phase (temperature T) after. Each cycle thus starts with a large step that leaves
    the current mode and ends sampling it with small steps. Stepping past K is an error: through
    `vr_mcmc.sample`, K must be num_warmup + num_samples.
    """

    def __init__(self, num_cycles: int, total_steps: int, exploration: float = 0.8):
        if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
            raise ValueError(f"num_cycles must be an integer >= 1, got {num_cycles!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < num_cycles:
            raise ValueError(f"total_steps must be an integer >= num_cycles={num_cycles} (the run's number of steps), "
                             f"got {total_steps!r}")
        if isinstance(exploration, bool) or not isinstance(exploration, (int, float)) or not 0.0 <= exploration < 1.0:
            raise ValueError(f"exploration must be the fraction of each cycle spent exploring, in [0, 1) (Zhang et "
                             f"al. use 0.8 or so; 0 samples all along), got {exploration!r}")
        self.num_cycles, self.total_steps, self.exploration = num_cycles, total_steps, float(exploration)
        self.cycle_length = math.ceil(total_steps / num_cycles)

    def __call__(self, k: int) -> tuple[float, float, bool]:
        if k >= self.total_steps:
            raise ValueError(f"the Cyclical schedule has total_steps={self.total_steps} but the sampler is making "
                             f"step {k + 1}: build it with total_steps = the run's number of steps (through "
                             "vr_mcmc.sample, num_warmup + num_samples)")
        r = (k % self.cycle_length) / self.cycle_length
        sampling = r >= self.exploration
        return 0.5 * (math.cos(math.pi * r) + 1.0), 1.0 if sampling else 0.0, sampling

    def __repr__(self) -> str:
        return f"Cyclical(num_cycles={self.num_cycles}, total_steps={self.total_steps}, exploration={self.exploration})"
