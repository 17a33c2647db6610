"""Warmup adaptation: dual averaging of the step size and a windowed diagonal mass matrix (as Stan)."""

from __future__ import annotations

import math

import torch

__all__ = ["DualAveraging", "WelfordDense", "WelfordDiagonal", "terminal_start", "warmup_windows"]


class DualAveraging:
    """Nesterov dual averaging of log ε toward a target acceptance δ (Hoffman & Gelman 2014, §3.2).

    After each step with acceptance α_t: H̄ ← (1 − 1/(t+t0))·H̄ + (δ − α_t)/(t+t0);
    log ε = μ − √t/γ·H̄; log ε̄ ← t^(−κ)·log ε + (1 − t^(−κ))·log ε̄, with μ = log(10·ε_0).
    `restart_calm` starts the final fine-tuning phase (μ = log ε̄, γ 10× larger, κ = 1).
    """

    def __init__(self, step_size: float, target: float, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75):
        if not 0 < target < 1:
            raise ValueError(f"the target acceptance must lie in (0, 1), got {target}")
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.initial_gamma, self.initial_kappa = gamma, kappa
        self.restart(step_size)

    def restart_calm(self, step_size: float) -> None:
        """Fine tuning around a step size already near the target: iterates shrink toward it and move
        with a 10× smaller gain. The averaged step then lands where the acceptance *at that step*
        is the target: with Stan's gain (γ = 0.05) the iterates swing by factors of e and more, and
        as the acceptance falls steeply past the target, their geometric mean sits well below the
        root (realized acceptance 0.95 for a target of 0.8 on a 20-D Gaussian)."""
        self.restart(step_size, mu=math.log(step_size), gamma=10 * self.initial_gamma)
        self.kappa = 1.0  # a plain mean of the iterates' log ε: the calm iterates are all informative

    def restart(self, step_size: float, *, mu: float | None = None, gamma: float | None = None) -> None:
        """Start averaging afresh from ``step_size``; the iterates shrink toward ``mu`` (default
        log(10·step_size), which favours exploring larger steps) with gain 1/``gamma``."""
        self.mu = math.log(10 * step_size) if mu is None else mu
        self.gamma = self.initial_gamma if gamma is None else gamma
        self.kappa = self.initial_kappa
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
        """A regularized estimate: (n/(n+5))·var + (5/(n+5))·1e-3·mean(var). Stan adds 1e-3 itself,
        on the unconstrained scale; relative to the variances it does not swamp parameters of scale
        0.001 (the coefficients of sblrc-blr, whose variance 1e-6 it would make 1.1e-5, forcing
        steps 3× too small for them and leaving the noise scale σ mixing with an ESS of 5)."""
        var = self.m2 / max(self.n - 1, 1)
        floor = 1e-3 * var.mean() + torch.finfo(var.dtype).tiny
        return (self.n / (self.n + 5.0)) * var + (5.0 / (self.n + 5.0)) * floor

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class WelfordDense(WelfordDiagonal):
    """Running mean and covariance (Welford) of the draws, for a dense inverse mass matrix."""

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(x), torch.zeros(x.numel(), x.numel(), dtype=torch.float64,
                                                                   device=x.device)
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += torch.outer(delta, x - self.mean)

    def variance(self) -> torch.Tensor:
        """A regularized covariance, shrunk toward its diagonal (positive definite for n ≥ 1):
        (n/(n+5))·Σ + (5/(n+5))·(diag Σ + 1e-3·mean(diag Σ)·I)."""
        cov = self.m2 / max(self.n - 1, 1)
        cov = 0.5 * (cov + cov.T)
        diag = cov.diagonal()
        target = torch.diag(diag + 1e-3 * diag.mean() + torch.finfo(cov.dtype).tiny)
        return (self.n / (self.n + 5.0)) * cov + (5.0 / (self.n + 5.0)) * target


def warmup_windows(num_warmup: int, init_buffer: int = 75, term_buffer: int | None = None,
                   base_window: int = 25) -> list[tuple[int, int]]:
    """Stan's slow mass-matrix windows as (first step, last step), 1-based step counts of the warmup.

    A fast initial buffer (step size only), doubling slow windows that estimate the variance, and a
    terminal buffer (step size only); for short warmups the buffers shrink to 15%/75%/10% as in
    Stan. The terminal buffer is max(100, 20% of the warmup), not Stan's 50 steps: the final step
    size is an average over it, and the acceptance falls steeply with the step (eight schools:
    0.95 → 0.76 → 0.47 at ε = 0.3, 0.45, 0.6), so the ±0.03 of an average over 200 noisy
    acceptances is already most of a ±0.05 tolerance.
    """
    if term_buffer is None:
        term_buffer = max(100, num_warmup // 5)
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


def terminal_start(num_warmup: int, windows: list[tuple[int, int]]) -> int | None:
    """The warmup step after which the step size is fine-tuned from the averaged one
    (`DualAveraging.restart_calm`): the end of the last mass window (``windows`` from
    `warmup_windows`), or, without a mass matrix, after a quarter of it (the fast phase needs ~100
    steps even from a step 100× off; the longer the calm phase, the nearer the acceptance at the
    final step is to the target). None when the warmup is too short (< 20 steps) to split."""
    if windows:
        return windows[-1][1]
    return None if num_warmup < 20 else num_warmup // 4
