"""Warmup adaptation: dual averaging of the step size and a windowed diagonal mass matrix (as Stan)."""

from __future__ import annotations

import math

import torch

__all__ = ["DualAveraging", "WelfordDiagonal", "warmup_windows"]


class DualAveraging:
    """Nesterov dual averaging of log ε toward a target acceptance δ (Hoffman & Gelman 2014, §3.2).

    After each step with acceptance α_t: H̄ ← (1 − 1/(t+t0))·H̄ + (δ − α_t)/(t+t0);
    log ε = μ − √t/γ·H̄; log ε̄ ← t^(−κ)·log ε + (1 − t^(−κ))·log ε̄, with μ = log(10·ε_0).
    """

    def __init__(self, step_size: float, target: float, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75):
        if not 0 < target < 1:
            raise ValueError(f"the target acceptance must lie in (0, 1), got {target}")
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.restart(step_size)

    def restart(self, step_size: float) -> None:
        self.mu = math.log(10 * step_size)
        self.t = 0
        self.h_bar = 0.0
        self.log_step = math.log(step_size)
        self.log_step_avg = 0.0

    def update(self, accept_prob: float) -> float:
        """Record one step's acceptance probability; returns the next step size."""
        accept_prob = 0.0 if not math.isfinite(accept_prob) else min(1.0, accept_prob)
        self.t += 1
        w = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target - accept_prob)
        self.log_step = self.mu - math.sqrt(self.t) / self.gamma * self.h_bar
        eta = self.t ** (-self.kappa)
        self.log_step_avg = eta * self.log_step + (1 - eta) * self.log_step_avg
        return math.exp(self.log_step)

    @property
    def final_step_size(self) -> float:
        return math.exp(self.log_step_avg) if self.t else math.exp(self.log_step)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class WelfordDiagonal:
    """Running mean and variance (Welford) of the draws, for a diagonal inverse mass matrix."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(x), torch.zeros_like(x)
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def variance(self) -> torch.Tensor:
        """Stan's regularized estimate: (n/(n+5))·var + 1e-3·(5/(n+5))."""
        var = self.m2 / max(self.n - 1, 1)
        return (self.n / (self.n + 5.0)) * var + 1e-3 * (5.0 / (self.n + 5.0))

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def warmup_windows(num_warmup: int, init_buffer: int = 75, term_buffer: int = 50,
                   base_window: int = 25) -> list[tuple[int, int]]:
    """Stan's slow mass-matrix windows as (first step, last step), 1-based step counts of the warmup.

    A fast initial buffer (step size only), doubling slow windows that estimate the variance, and a
    fast terminal buffer; for short warmups the buffers shrink to 15%/75%/10% as in Stan.
    """
    if num_warmup < 20:
        return []
    if init_buffer + base_window + term_buffer > num_warmup:
        init_buffer, term_buffer = int(0.15 * num_warmup), int(0.1 * num_warmup)
        base_window = num_warmup - init_buffer - term_buffer
    windows = []
    start, window = init_buffer, base_window
    last = num_warmup - term_buffer
    while start + window <= last:
        end = last if start + 3 * window > last else start + window  # the last window absorbs the rest
        windows.append((start + 1, end))
        start, window = end, 2 * window
    return windows
