"""The No-U-Turn sampler, multinomial with the generalized U-turn criterion (Hoffman & Gelman 2014;
Betancourt 2017), as Stan's ``base_nuts``.

One transition draws r ~ N(0, M) and doubles a leapfrog trajectory of H(θ, r) = U(θ)/T + ½ rᵀM⁻¹r,
each time in a random direction, until the trajectory or one of its subtrees makes a U-turn, a
leapfrog step diverges, or ``max_tree_depth`` doublings were made. The new state is drawn from the
trajectory: within a subtree with probability ∝ exp(−H) (multinomial), and the newest subtree is
taken over the old trajectory with probability min(1, w_new / w_old) (biased progressive sampling,
which favours moving far). The U-turn test of a span of states with momenta summing to ρ is
ρ·M⁻¹r₋ > 0 and ρ·M⁻¹r₊ > 0 at its two ends; it is applied to the whole trajectory, to every
subtree, and, as Stan does since 2.23, to each merged pair of subtrees extended by one state of the
other (which catches U-turns that fall between two subtrees).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .hmc import leapfrog
from .metric import unflatten
from .metropolis import MetropolisSampler
from .priors import Prior

__all__ = ["NUTS"]

Tensors = list[torch.Tensor]


def _flat(ts: Tensors) -> torch.Tensor:
    """A flat copy of ``ts`` (the momenta are updated in place, so the ends keep copies)."""
    if len(ts) == 1:
        return ts[0].reshape(-1).clone()
    return torch.cat([t.reshape(-1) for t in ts])


def _log_add_exp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def _no_u_turn(sharp_minus: torch.Tensor, sharp_plus: torch.Tensor, rho: torch.Tensor) -> bool:
    """Betancourt's generalized criterion: the span keeps going while ρ·M⁻¹r > 0 at both ends."""
    return torch.dot(sharp_plus, rho).item() > 0 and torch.dot(sharp_minus, rho).item() > 0


class _Span:
    """A run of consecutive states in integration order: the momenta r and M⁻¹r at its first and
    last state, ρ (their sum over the span), the log of its weight Σ exp(H0 − H), and the state
    drawn from it (position, evaluation, H)."""

    __slots__ = ("log_weight", "p_beg", "p_end", "rho", "sample", "sharp_beg", "sharp_end")

    def __init__(self, p_beg, sharp_beg, p_end, sharp_end, rho, log_weight, sample):
        self.p_beg, self.sharp_beg, self.p_end, self.sharp_end = p_beg, sharp_beg, p_end, sharp_end
        self.rho, self.log_weight, self.sample = rho, log_weight, sample

    def reversed(self) -> _Span:
        return _Span(self.p_end, self.sharp_end, self.p_beg, self.sharp_beg, self.rho, self.log_weight, self.sample)


def _merged_no_u_turn(a: _Span, b: _Span, rho: torch.Tensor) -> bool:
    """The criterion on the span a + b (consecutive, in this order; ρ = ρ_a + ρ_b), and on a extended by
    b's first state and b extended by a's last state (Stan's checks across merged subtrees). The twelve
    products are one matrix product (a few tensor operations instead of six dots)."""
    sharps = torch.stack([a.sharp_beg, a.sharp_end, b.sharp_beg, b.sharp_end])
    rhos = torch.stack([rho, a.rho + b.p_beg, b.rho + a.p_end])
    (ab, ae, bb, be) = (sharps @ rhos.T).tolist()
    # whole: a's first and b's last state; a + b's first: a's first and b's first; a's last + b: a's last, b's last
    return ab[0] > 0 and be[0] > 0 and ab[1] > 0 and bb[1] > 0 and ae[2] > 0 and be[2] > 0


class NUTS(MetropolisSampler):
    """The No-U-Turn sampler (Stan's multinomial NUTS) on a closure, with step size ε = ``lr``.

    Each `step` is one NUTS transition: at most 2^``max_tree_depth`` − 1 leapfrog steps. The warmup
    (``adapt(True, num_warmup=...)``) is Stan's: dual averaging of ε toward ``target_accept`` (0.8) on
    the acceptance statistic mean over the trajectory of min(1, exp(H0 − H)), and M⁻¹ estimated in
    Stan's windows, diagonal or, with ``dense_mass=True``, dense, ending with Stan's 50-step terminal
    buffer (``step_size_tuning="stan"``; HMC's ``"calm"`` end is available). A leapfrog step whose energy error
    H − H0 exceeds ``max_energy_error`` (1000, as Stan), or whose U or ∇U is not finite (or whose
    closure raises a domain error), is a divergence: the trajectory stops there and the new state is
    drawn from the part built before the diverging subtree.

    ``stats``: lp (−U/T at the new state), acceptance_rate (the statistic above), step_size, diverging,
    energy (H at the new state), energy_error (its H − H0), tree_depth (the doublings made),
    n_steps (leapfrog steps), reached_max_tree_depth, grad_evals (n_steps·N). After a step ``p.grad``
    holds ∇U at the new θ.
    """

    default_target_accept = 0.8
    default_step_size_tuning = "stan"  # Stan's warmup end: no divergences where Stan has none (see MetropolisSampler)
    adapts_mass = True

    def __init__(self, params: Iterable, lr: float, num_data: int = 1, *, max_tree_depth: int = 10,
                 prior: Prior | None = None, temperature: float = 1.0, target_accept: float | None = None,
                 max_energy_error: float = 1000.0, dense_mass: bool = False,
                 generator: torch.Generator | None = None, step_size_tuning: str | None = None):
        if isinstance(max_tree_depth, bool) or not isinstance(max_tree_depth, int) or max_tree_depth < 1:
            raise ValueError(f"max_tree_depth must be an integer >= 1, got {max_tree_depth!r}")
        super().__init__(params, lr, num_data, prior=prior, temperature=temperature, target_accept=target_accept,
                         max_energy_error=max_energy_error, dense_mass=dense_mass, generator=generator,
                         step_size_tuning=step_size_tuning)
        self.max_tree_depth = max_tree_depth

    # -- random numbers (methods, so that a test can feed its own) ----------------------------------

    def _uniform(self) -> float:
        """u ~ U(0, 1) in float64."""
        return torch.rand((), dtype=torch.float64, generator=self.generator,
                          device=self.generator.device if self.generator else None).item()

    def _forward(self) -> bool:
        """The direction of the next doubling: forward with probability ½."""
        return self._uniform() > 0.5

    # -- the transition -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:
        if closure is None:
            raise ValueError("NUTS.step needs the closure that computes the full-data loss and calls backward")
        cur = self._current_point(closure)
        params = self._params()
        metric, temp = self.metric, self.temperature
        self._inv_mass = inv_mass = metric.leapfrog_form()
        self._diagonal = None if metric.dense else inv_mass
        self._closure, self._params_now = closure, params
        start = [p.detach().clone() for p in params]
        momentum = metric.sample_mass(start)
        h0 = cur.potential / temp + 0.5 * metric.quad_inv_mass(momentum, self._diagonal)
        self._h0, self._eps = h0, self.step_size
        self._n_steps, self._sum_accept, self._diverging = 0, 0.0, False

        self._inv_mass_flat = None if metric.dense else _flat(inv_mass)
        p0 = _flat(momentum)
        sharp0 = self._sharp(p0)
        trajectory = _Span(p0, sharp0, p0, sharp0, p0, 0.0, (start, cur, h0))
        # the states at the two ends, from which the trajectory is extended: (θ, r, evaluation)
        ends = {True: (start, momentum, cur), False: (start, momentum, cur)}
        depth = 0
        with self._restoring_on_error(start, cur):
            while depth < self.max_tree_depth:
                forward = self._forward()
                theta, r, point = ends[forward]
                self._set(theta)
                self._r = [m.clone() for m in r]
                self._point = point
                subtree = self._build_tree(depth, 1.0 if forward else -1.0)
                if subtree is None:  # a divergence or a U-turn inside the new subtree: it is not used
                    break
                ends[forward] = ([p.detach().clone() for p in params], self._r, self._point)
                depth += 1
                # biased progressive sampling: the new subtree's draw with probability min(1, w_new / w_old)
                new_sample = trajectory.sample
                if (subtree.log_weight > trajectory.log_weight
                        or self._uniform() < math.exp(subtree.log_weight - trajectory.log_weight)):
                    new_sample = subtree.sample
                log_weight = _log_add_exp(trajectory.log_weight, subtree.log_weight)
                first, second = (trajectory, subtree) if forward else (trajectory.reversed(), subtree)
                rho = first.rho + second.rho
                persist = _merged_no_u_turn(first, second, rho)
                joined = _Span(first.p_beg, first.sharp_beg, second.p_end, second.sharp_end, rho, log_weight,
                               new_sample)
                trajectory = joined if forward else joined.reversed()
                if not persist:
                    break

        theta, point, h = trajectory.sample
        self._set(theta)
        self._finish(point)
        n = self._n_steps
        accept_prob = self._sum_accept / n if n else 0.0
        self.stats = {"lp": -point.potential / temp, "acceptance_rate": accept_prob, "step_size": self._eps,
                      "diverging": float(self._diverging), "energy": h, "energy_error": h - h0,
                      "tree_depth": float(depth), "n_steps": float(n),
                      "reached_max_tree_depth": float(depth >= self.max_tree_depth),
                      "grad_evals": float(n * self.num_data)}
        self._closure = self._params_now = self._r = self._point = None
        self._adapt_after_step(accept_prob)
        return torch.tensor(point.potential)

    def _leaf(self, sign: float) -> _Span | None:
        """One leapfrog step from the working state (the parameters, ``_r``, ``_point``) in direction ``sign``."""
        params = self._params_now
        new = self._point

        def grad_fn(position: Tensors) -> tuple[bool, Tensors]:
            nonlocal new
            new = self._evaluate(self._closure, params)
            return new.finite, new.grads

        _, _, _, finite = leapfrog(params, self._r, self._point.grads, sign * self._eps, self._inv_mass, grad_fn,
                                   self.temperature)
        self._point = new
        self._n_steps += 1
        h = math.inf
        if finite:
            p = _flat(self._r)
            sharp = self._sharp(p)
            h = new.potential / self.temperature + 0.5 * torch.dot(sharp, p).item()
            if math.isnan(h):
                h = math.inf
        log_w = self._h0 - h
        self._sum_accept += 1.0 if log_w > 0 else math.exp(log_w)
        if not finite or -log_w > self.max_energy_error:
            self._diverging = True
            return None
        return _Span(p, sharp, p, sharp, p, log_w, ([q.detach().clone() for q in params], new, h))

    def _sharp(self, p: torch.Tensor) -> torch.Tensor:
        """M⁻¹r for the flat momentum p."""
        if self._inv_mass_flat is not None:
            return self._inv_mass_flat * p
        return _flat(self.metric.times_inv_mass(unflatten(p, self._params_now)))

    def _build_tree(self, depth: int, sign: float) -> _Span | None:
        """A subtree of 2^depth leapfrog steps from the working state; None if it diverges or makes a U-turn."""
        if depth == 0:
            return self._leaf(sign)
        first = self._build_tree(depth - 1, sign)
        if first is None:
            return None
        second = self._build_tree(depth - 1, sign)
        if second is None:
            return None
        log_weight = _log_add_exp(first.log_weight, second.log_weight)
        # within a subtree: the second half's draw with probability w_second / w (multinomial)
        sample = first.sample
        if second.log_weight > log_weight or self._uniform() < math.exp(second.log_weight - log_weight):
            sample = second.sample
        rho = first.rho + second.rho
        if not _merged_no_u_turn(first, second, rho):
            return None
        return _Span(first.p_beg, first.sharp_beg, second.p_end, second.sharp_end, rho, log_weight, sample)
