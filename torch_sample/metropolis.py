"""Full-data samplers driven by a closure (as torch.optim.LBFGS): the shared machinery of ULA, MALA, HMC.

Target π(θ) ∝ exp(−U(θ)/T), U(θ) = N·loss(θ) + (−log p(θ)) where ``closure()`` computes the loss
(the mean NLL over the whole data set; with ``num_data=1``, U itself), calls ``backward`` and
returns it. Every evaluation is checked: a non-finite U or ∇U at a proposal is a rejection marked
``diverging`` (never an exception), and a rejected proposal restores the parameters together with
the cached U and ∇U of the current state. After each step ``p.grad`` holds ∇U at the current θ.
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
    check_probability,
    gaussian_noise,
    restore_generator,
    state_from_plain,
    state_to_plain,
)
from .adaptation import DualAveraging, WelfordDense, WelfordDiagonal, terminal_start, warmup_windows
from .priors import Prior

__all__ = ["MetropolisSampler"]


# Exceptions from the closure that mean "θ is outside the density's domain" (torch.distributions'
# support checks raise ValueError, a Cholesky of a matrix that is not positive definite LinAlgError):
# at a proposal they are a divergence, like a NaN; at the chain's start they propagate. Any other
# exception propagates after the parameters, their .grad and the cached U are restored.
DOMAIN_ERRORS = (ValueError, ArithmeticError, torch.linalg.LinAlgError)


class _Point:
    """U, ∇U and the parameters' version counters at one θ (``error``: the closure's domain error)."""

    def __init__(self, potential: float, grads: list[torch.Tensor], finite: bool, versions: list[int],
                 error: BaseException | None = None):
        self.potential, self.grads, self.finite, self.versions = potential, grads, finite, versions
        self.error = error


class MetropolisSampler(Optimizer):
    """Base of the closure-driven samplers. ``lr`` is the step size (one for all groups); ``prior``
    may differ per param group; ``target_accept`` is the acceptance the step-size adaptation aims at."""

    default_target_accept = 0.8
    adapts_mass = False
    adapts_step_size = True  # `adapt` tunes the step size to ``target_accept`` (all but ULA)

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
        self.max_energy_error = check_number("max_energy_error", max_energy_error, 0.0, strict=True)
        self.generator = generator
        check_full_precision(self._params(), type(self).__name__)
        if target_accept is not None:
            check_probability("target_accept", target_accept)
        self.dual = DualAveraging(float(lr), target_accept or self.default_target_accept)
        self.dense_mass = bool(dense_mass)
        self.welford = WelfordDense() if self.dense_mass else WelfordDiagonal()
        # dense M⁻¹ = Σ over the flattened parameters, and its Cholesky factor (None: M⁻¹ = I)
        self.inv_mass_dense: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None
        self.adapting = False
        self._warmup_step = 0
        self._windows: list[tuple[int, int]] = []
        self._terminal_start: int | None = None
        self._current: _Point | None = None
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

    def _inv_mass(self) -> list[torch.Tensor]:
        out = []
        for p in self._params():
            state = self.state[p]
            if "inv_mass" not in state:
                state["inv_mass"] = torch.ones_like(p)
            out.append(state["inv_mass"])
        return out

    def _noise(self, p: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(p, self.generator)

    # The metric: M⁻¹ is diagonal (``state[p]["inv_mass"]``) or, with ``dense_mass``, a dense Σ
    # over the flattened parameters (``inv_mass_dense``, Σ = LLᵀ).

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _unflat(self, vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        out, offset = [], 0
        for t in like:
            out.append(vector[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def _dense_factor(self, like: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.dense_mass or self.inv_mass_dense is None:
            return None
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self.inv_mass_dense)
        return self._chol.to(like[0].dtype)

    def _times_inv_mass(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """M⁻¹v."""
        chol = self._dense_factor(vs)
        if chol is None:
            return [w * v for w, v in zip(self._inv_mass(), vs)]
        return self._unflat(chol @ (chol.T @ self._flat(vs)), vs)

    def _quad_inv_mass(self, vs: list[torch.Tensor]) -> float:
        """vᵀM⁻¹v."""
        chol = self._dense_factor(vs)
        if chol is None:
            return sum(float((w * v * v).sum()) for w, v in zip(self._inv_mass(), vs))
        return float((chol.T @ self._flat(vs)).square().sum())

    def _quad_mass(self, vs: list[torch.Tensor]) -> float:
        """vᵀMv."""
        chol = self._dense_factor(vs)
        if chol is None:
            return sum(float((v * v / w).sum()) for w, v in zip(self._inv_mass(), vs))
        return float(torch.linalg.solve_triangular(chol, self._flat(vs)[:, None], upper=False).square().sum())

    def _noise_inv_mass_sqrt(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """A draw of N(0, M⁻¹)."""
        xi = [self._noise(x) for x in like]
        chol = self._dense_factor(like)
        if chol is None:
            return [w.sqrt() * e for w, e in zip(self._inv_mass(), xi)]
        return self._unflat(chol @ self._flat(xi), like)

    def _noise_mass_sqrt(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """A draw of N(0, M) (HMC's momentum)."""
        xi = [self._noise(x) for x in like]
        chol = self._dense_factor(like)
        if chol is None:
            return [e.div_(w.sqrt()) for w, e in zip(self._inv_mass(), xi)]
        r = torch.linalg.solve_triangular(chol.T, self._flat(xi)[:, None], upper=True)[:, 0]
        return [t.clone() for t in self._unflat(r, like)]

    def _langevin_proposal(self, start: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """θ − h·M⁻¹∇U(θ) + √(2hT)·M^(−1/2)·ξ, the move of ULA and MALA's proposal."""
        h = self.step_size
        scale = math.sqrt(2 * h * self.temperature)
        drift = self._times_inv_mass(grads)
        noise = self._noise_inv_mass_sqrt(start)
        return [x - h * d + scale * e for x, d, e in zip(start, drift, noise)]

    # -- evaluation -------------------------------------------------------------------------------

    def _evaluate(self, closure: Callable[[], Any], params: list[torch.Tensor] | None = None) -> _Point:
        """U, ∇U at the parameters' current values (``params``: `_params()`, when the caller has it)."""
        if params is None:
            params = self._params()
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                loss = closure()
        except DOMAIN_ERRORS as error:  # outside the density's domain: a divergence, as Stan rejects on domain_error
            return _Point(math.inf, [torch.zeros_like(p) for p in params], False, [p._version for p in params], error)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"the closure must return the loss as a one-element tensor (after loss.backward()), got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
            )
        if all(p.grad is None for p in params):
            raise RuntimeError("the closure returned without gradients: it must call loss.backward() before returning "
                               "the loss (as for torch.optim.LBFGS)")
        num_data = self.num_data
        potential = num_data * loss.item()
        groups = self.param_groups
        if len(groups) == 1 and groups[0]["prior"] is None and len(groups[0]["params"]) == len(params):
            # The common case, without the per-group work. With num_data = 1 the gradients are the closure's own
            # tensors, not copies: p.grad was None before the closure, so backward made new ones.
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() if num_data == 1
                     else p.grad.detach() * num_data for p in params]
        else:
            grads = []
            with torch.no_grad():
                for group in groups:
                    prior = group["prior"]
                    for p in group["params"]:
                        if not p.requires_grad:
                            continue
                        g = torch.zeros_like(p) if p.grad is None else p.grad.detach() * num_data
                        if prior is not None:
                            prior.add_grad_(p, g)
                            potential -= float(prior.log_prob(p))
                        grads.append(g)
        # A finite sum means finite entries (one reduction); a non-finite sum may be an overflow, so check then.
        finite = math.isfinite(potential) and all(math.isfinite(g.sum().item()) or bool(g.isfinite().all())
                                                  for g in grads)
        return _Point(potential, grads, finite, [p._version for p in params])

    def _current_point(self, closure: Callable[[], Any]) -> _Point:
        params = self._params()
        cur = self._current
        if cur is None or cur.versions != [p._version for p in params]:
            for p in params:
                if not bool(torch.isfinite(p).all()):
                    raise ValueError("the parameters hold NaN or inf: start the chain from finite values")
            cur = self._evaluate(closure)
            if cur.error is not None:
                raise cur.error
            if not cur.finite:
                raise ValueError(
                    f"the log density at the current parameters is not finite (U = {cur.potential}): start the chain "
                    "where the closure's loss and its gradient are finite"
                )
            self._current = cur
        return cur

    @torch.no_grad()
    def _set(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self._params(), values):
            p.copy_(v)

    @contextmanager
    def _restoring_on_error(self, start: list[torch.Tensor], cur: _Point) -> Iterator[None]:
        """Any exception raised inside (by the closure, or a KeyboardInterrupt) leaves the sampler at
        ``start`` with ``cur``'s U and ∇U, as a rejection would, and then propagates."""
        try:
            yield
        except BaseException:
            self._set(start)
            self._finish(cur)
            raise

    def _finish(self, point: _Point) -> None:
        """Make ``point`` the current state: its gradient in ``.grad``, its versions recorded."""
        params = self._params()
        for p, g in zip(params, point.grads):
            p.grad = g.clone()
        point.versions = [p._version for p in params]
        self._current = point

    # -- adaptation -------------------------------------------------------------------------------

    def adapt(self, on: bool = True, num_warmup: int | None = None) -> None:
        """Start (``on=True``) or end warmup adaptation. During it the step size follows dual averaging
        toward ``target_accept``. Given ``num_warmup`` (the planned warmup steps), samplers with a
        mass matrix (HMC) also estimate a diagonal one in Stan's windows, and the last 100 steps
        (10% of a short warmup) fine-tune the step size from the averaged one with a small gain, so
        that the acceptance at the final step size is the target (see `DualAveraging.restart_calm`).
        Ending it sets the step size to the dual-averaged one."""
        if on:
            self.adapting = True
            self._warmup_step = 0
            self._windows = warmup_windows(num_warmup) if (num_warmup and self.adapts_mass) else []
            self._terminal_start = terminal_start(num_warmup, self._windows) if num_warmup else None
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
                    var = self.welford.variance(fallback=self._metric_diagonal())
                    if self.dense_mass:
                        self.inv_mass_dense, self._chol = var, None
                    else:
                        offset = 0
                        for m in self._inv_mass():
                            m.copy_(var[offset : offset + m.numel()].reshape(m.shape).to(m.dtype))
                            offset += m.numel()
                    self.welford.reset()
                    if t != self._terminal_start:
                        self.dual.restart(self.step_size)
        if t == self._terminal_start:
            step = self.dual.final_step_size
            self.dual.restart_calm(step)
            self._set_step_size(step)

    def _metric_diagonal(self) -> torch.Tensor:
        """The current M⁻¹'s diagonal over the flattened parameters (float64)."""
        if self.dense_mass:
            if self.inv_mass_dense is None:
                return torch.ones(sum(p.numel() for p in self._params()), dtype=torch.float64)
            return self.inv_mass_dense.diagonal()
        return torch.cat([m.detach().reshape(-1).to(torch.float64) for m in self._inv_mass()])

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = state_to_plain(super().state_dict(), self.generator)
        state["adaptation"] = {"dual": self.dual.state_dict(), "welford": self.welford.state_dict(),
                               "adapting": self.adapting, "warmup_step": self._warmup_step,
                               "windows": list(self._windows),
                               "terminal_start": self._terminal_start, "inv_mass_dense": self.inv_mass_dense}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, generator = state_from_plain(state_dict)
        adaptation = state_dict.pop("adaptation", None)
        super().load_state_dict(state_dict)
        if adaptation is not None:
            self.dual.load_state_dict(adaptation["dual"])
            self.welford.load_state_dict(adaptation["welford"])
            self.adapting = adaptation["adapting"]
            self._warmup_step = adaptation["warmup_step"]
            self._windows = [tuple(w) for w in adaptation["windows"]]
            self._terminal_start = adaptation.get("terminal_start")
            self.inv_mass_dense, self._chol = adaptation.get("inv_mass_dense"), None
        restore_generator(self.generator, generator)
        self._current = None  # re-evaluated at the next step, at the loaded parameters
