"""The stochastic-gradient Langevin diffusion that SGLD, SAGA-LD, SVRG-LD and SGLD-CV share.

A sampler is this diffusion × a gradient estimator (`vr_mcmc.estimators`). Math (DESIGN.md §2):
target π(θ) ∝ exp(−U(θ)/T), U(θ) = −log p(θ) − Σ_i log p(y_i | x_i, θ); with v the estimator's
estimate of the data term and h = ``lr``,

    θ ← θ − h·(v + ∇(−log p(θ))) + √(2hT)·ξ,   ξ ~ N(0, I).

``temperature=0`` is the corresponding optimizer (SGD, SAGA, SVRG). With ``momentum=μ`` the
update is torch.optim.SGD's heavy ball, b ← μ·b + ∇Ũ, θ ← θ − h·b, and for T > 0 the noise
enters the velocity with variance 2(1−μ)hT: stochastic-gradient HMC (Chen et al. 2014, eq. 15,
friction 1−μ). ``nesterov=True`` (optimization only) is torch.optim.SGD's Nesterov step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from vr_mcmc.estimators import Estimator, Minibatch
from vr_mcmc.estimators.base import grad_or_zeros

from ._shared import check_number, gaussian_noise, restore_generator, state_from_plain, state_to_plain
from .priors import Prior

__all__ = ["DivergenceError", "LangevinSampler", "langevin_update"]

REDUCTIONS = ("mean", "sum")


class DivergenceError(RuntimeError):
    """A stochastic-gradient chain gave ``max_divergences`` non-finite steps in a row."""


def langevin_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float,
    temperature: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    generator: torch.Generator | None = None,
) -> None:
    """One step of the (possibly underdamped) Langevin update, in place; ``grads`` hold ∇Ũ."""
    noise_scale = math.sqrt(2.0 * lr * temperature * (1.0 - momentum)) if temperature > 0 else 0.0
    if not params:
        return
    # The noise in parameter order (the draws of a loop over the parameters), then each operation on all
    # parameters at once: torch._foreach_* does per element what the loop did, without a Python round trip
    # per parameter and operation (a third of an SGLD step's update on a small model).
    noise = [gaussian_noise(p, generator) for p in params] if noise_scale else None
    if momentum:
        bufs = list(momentum_buffers)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        if noise is not None:  # velocity u = −h·b gets √(2(1−μ)hT)·ξ
            torch._foreach_add_(bufs, noise, alpha=-noise_scale / lr)
        d = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(params, d, alpha=-lr)
    else:
        torch._foreach_add_(params, grads, alpha=-lr)
        if noise is not None:
            torch._foreach_add_(params, noise, alpha=noise_scale)


class LangevinSampler(Optimizer):
    """Base of the stochastic-gradient Langevin samplers (a `torch.optim.Optimizer`).

    Param-group options: ``lr`` (step size h > 0), ``prior`` (a `torch_sample.priors.Prior` or
    None for none / folded into the loss), ``temperature`` (T ≥ 0), ``momentum`` (0 ≤ μ < 1),
    ``nesterov``. ``num_data`` is N, the data set's size; the loss backpropagated before each
    step is the minibatch *mean* NLL (``loss_reduction="sum"``: the batch sum).

    ``step(closure=None, *, indices=None, loss=None)``: ``closure`` (optional, as for
    torch.optim.LBFGS) zeroes the gradients, computes the batch loss, backpropagates and returns
    it; it is called once at θ before the estimate (some estimators call it again elsewhere).
    ``indices`` are the batch's example indices (required by table-based estimators, and used
    to count gradient evaluations). ``loss``: the batch loss, for ``lp`` when there is no closure.

    After each step ``stats`` holds ``step_size``, ``grad_evals`` (per-example gradients computed
    this step; NaN when the batch size is unknown), ``lp`` (the minibatch estimate of log π up to
    a constant, −(N·loss + (−log p(θ))), when the loss is known), ``noise_ratio`` and
    estimator-specific entries.

    ``noise_ratio`` = h·Var(v)/(2(1−μ)·T·P): the variance the estimate's noise adds to θ in a step
    over the variance of the injected noise, with Var(v) the trace of the estimator's covariance,
    estimated from the batch's per-example gradients (for SGLD (N²/B)(1 − B/N)·tr Cov(g_i), for
    SAGA-LD the same with g_i − h_i, for SVRG-LD/SGLD-CV with g_i(θ) − g_i(θ̃); see
    `vr_mcmc.estimators.noise`) and P the number of parameters it covers. It needs ``engine=`` (a
    `vr_mcmc.per_example.PerExampleGradients` on the model; SAGA-LD has one anyway) and a batch of
    at least two; otherwise it is NaN, and it never fails a step. It costs a few per-example norms
    a step (20% of a SAGA-LD step on the 2,410-parameter demo MLP, less on larger layers): set the
    attribute ``noise_ratio_every = k`` to measure it every k-th step only (NaN between), 0 never.
    Near 0, the sampler's own noise dominates and SG-MCMC is close to the exact Langevin
    diffusion: variance reduction cannot help.
    Of order 1 or more, the chain is mostly SGD noise (posterior too wide): use a variance-reduced
    estimator or a smaller step.

    Divergences: before the update, one fused reduction (the sum of ``torch._foreach_norm`` of the
    gradient estimates ∇Ũ) and the batch loss are checked; if either is not finite the step is skipped
    (θ, momentum and noise untouched: nothing needs restoring) and ``stats["diverging"]`` is True.
    After ``max_divergences`` such steps in a row (default 20; the attribute of the same name) `step`
    raises `DivergenceError` naming the likely causes (non-finite data, a step size too large).
    A table-based estimator (SAGA) has by then stored the bad gradient: the chain cannot recover.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        estimator: Estimator | None = None,
        *,
        prior: Prior | None = None,
        temperature: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        loss_reduction: str = "mean",
        engine: Any = None,
        generator: torch.Generator | None = None,
        max_divergences: int = 20,
        schedule: Any = None,
        extra_defaults: dict[str, Any] | None = None,
    ):
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a torch_sample.schedules schedule (e.g. Cyclical), got {schedule!r}")
        if isinstance(max_divergences, bool) or not isinstance(max_divergences, int) or max_divergences < 1:
            raise ValueError(f"max_divergences must be an integer >= 1, got {max_divergences!r}")
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be the number of examples in the data set (an integer >= 1), "
                             f"got {num_data!r}")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.num_data = num_data
        self.loss_reduction = loss_reduction
        self.generator = generator
        defaults = dict(lr=lr, prior=prior, temperature=temperature, momentum=momentum, nesterov=nesterov,
                        **(extra_defaults or {}))
        super().__init__(params, defaults)
        self.estimator = estimator if estimator is not None else Minibatch()
        if engine is not None:  # the table's source for SAGA; for the others, the noise_ratio diagnostic
            self.estimator.engine = engine
        if not self.estimator.unbiased and any(g["temperature"] > 0 for g in self.param_groups):
            raise ValueError(f"{self.estimator!r} is biased and fit for optimization only: use temperature=0, or "
                             "an unbiased estimator (SAGA, SVRG, ControlVariate) for sampling")
        self.estimator.bind(self._trainable(), num_data, loss_reduction)
        self.stats: dict[str, float] = {}
        self.noise_ratio_every = 1  # measure noise_ratio every k-th step (NaN between); 0: never
        self.max_divergences = max_divergences
        self.check_finite = True  # the divergence check (False only to measure its cost)
        self._steps = 0
        self._divergences = 0  # non-finite steps in a row
        self._grad_norm_first: float | None = None
        self._grad_norm_last = math.nan
        self._loss_checked = False
        self._last_noise_var: torch.Tensor | None = None  # the estimator's latest noise_var (SGHMC's β estimate)
        self.schedule = schedule

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        check_number("lr (the step size)", group["lr"], 0.0, strict=True)
        check_number("temperature", group["temperature"], 0.0, strict=False)
        check_number("momentum", group["momentum"], 0.0, strict=False, high=1.0)
        prior = group["prior"]
        if prior is not None and not isinstance(prior, Prior):
            raise TypeError(f"prior must be a torch_sample.priors.Prior (Normal, Laplace, Flat) or None, got {prior!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["temperature"] > 0):
            raise ValueError("nesterov=True needs momentum > 0 and temperature=0 (Nesterov's step is an optimizer's "
                             "acceleration; for sampling use momentum= alone, i.e. SGHMC)")
        super().add_param_group(param_group)
        if hasattr(self, "estimator"):  # a group added after construction
            self.estimator.bind(self._trainable(), self.num_data, self.loss_reduction)

    def _noise_var_of(self, p: torch.Tensor) -> float:
        """The estimator's latest per-coordinate variance of its noise for parameter ``p`` (NaN if unknown)."""
        nv = self._last_noise_var
        if nv is None:
            return math.nan
        index = {id(q): k for k, q in enumerate(self._trainable())}
        k = index.get(id(p))
        return math.nan if k is None or k >= len(nv) else float(nv[k]) / p.numel()

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _check_indices(self, indices: Any) -> torch.Tensor | None:
        if indices is None:
            if self.estimator.needs_indices:
                raise ValueError(f"{type(self).__name__}.step needs the batch's example indices: step(indices=idx), "
                                 "with idx from a vr_mcmc.data.IndexedDataset")
            return None
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(f"indices must be integer example indices, got dtype {idx.dtype}")
        idx = idx.reshape(-1).to(torch.long)
        if idx.numel() > self.num_data:
            raise ValueError(f"the batch has {idx.numel()} examples but num_data={self.num_data}: num_data must be "
                             "the size of the whole data set")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_data):
            raise IndexError(
                f"example indices must lie in [0, {self.num_data}), got {int(idx.min())}..{int(idx.max())}"
            )
        return idx

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, indices: Any = None, loss: Any = None) -> Any:
        idx = self._check_indices(indices)
        if self.estimator.needs_closure and closure is None:
            raise ValueError(f"{type(self).__name__}.step needs the closure (it re-evaluates the batch's loss at the "
                             "estimator's centre): step(closure, indices=idx)")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._loss_checked and loss is not None:
            self._loss_checked = True
            self._check_loss_reduction(loss)
        self._count_step()
        info = self.estimator.estimate(idx, closure)
        noise_var = info.pop("noise_var", None)
        if noise_var is not None:
            self._last_noise_var = noise_var
        phase = self._schedule_phase()
        neg_log_prior = 0.0
        updates = []
        for group in self.param_groups:
            params, grads = [], []
            prior = group["prior"]
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                g = grad_or_zeros(p)
                if prior is not None:
                    prior.add_grad_(p, g)
                    if loss is not None:
                        neg_log_prior -= float(prior.log_prob(p))
                params.append(p)
                grads.append(g)
            updates.append((group, params, grads))
        diverging = self.check_finite and not self._finite([g for _, _, grads in updates for g in grads], loss)
        own_stats: dict[str, float] = {k: math.nan for k in self.extra_stats}
        if not diverging:
            for group, params, grads in updates:
                for key, value in self._update(params, grads, [self.state[p] for p in params],
                                               self._effective(group, phase)).items():
                    own_stats[key] = value if math.isnan(own_stats.get(key, math.nan)) else own_stats[key] + value
        evals = info.pop("grad_evals", None)
        lp = None
        if loss is not None:
            b = None if idx is None else idx.numel()
            nll = float(loss) * (self.num_data if self.loss_reduction == "mean" else self.num_data / (b or math.nan))
            lp = -(nll + neg_log_prior)
        self._set_stats(self._effective(self.param_groups[0], phase), phase, evals,
                        self._noise_ratio(noise_var, phase), own_stats, lp, info, diverging)
        if diverging:
            self._diverged(loss)
        return loss

    def _check_loss_reduction(self, loss: Any) -> None:
        """Warns once when ``loss`` (still attached to its graph) is visibly a batch *sum* while the sampler
        expects the mean: a torch loss built with reduction="sum" or a final ``.sum()``. Then the gradient, the
        per-example gradients and ``lp`` are all B times too large, and nothing else can tell (the sum's
        gradients are consistent with themselves). A loss whose last operation is something else (a sum plus a
        penalty, a division) is not checked."""
        node = getattr(loss, "grad_fn", None)
        if node is None or self.loss_reduction != "mean" or self.num_data == 1:
            return
        summed = getattr(node, "_saved_reduction", None) == 2 or type(node).__name__ == "SumBackward0"
        if summed:
            warnings.warn(
                f"{type(self).__name__}: the loss looks like a sum over the batch ({type(node).__name__}), but the "
                "sampler expects the batch *mean* NLL (it multiplies by num_data): with a sum every gradient is B "
                "times too large. Use reduction='mean', or pass loss_reduction='sum' to the sampler and to "
                "PerExampleGradients",
                stacklevel=3,
            )

    def _finite(self, grads: list[torch.Tensor], loss: Any) -> bool:
        """True when the estimate and the loss are finite: one fused reduction over the gradients."""
        total = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros(())
        if loss is not None:
            total = total + torch.as_tensor(loss, dtype=total.dtype, device=total.device).detach().reshape(()) * 0
        return self._finite_norm(float(total))  # the one synchronization

    # -- the per-step bookkeeping (shared with torch_sample.vectorized's stacked steps) ------------------------

    def _count_step(self) -> None:
        """Counts the step about to be made; tells the estimator whether to measure its noise this step."""
        every = self.noise_ratio_every
        self.estimator.diagnose = bool(every) and self._steps % every == 0
        self._steps += 1

    def _finite_norm(self, norm: float) -> bool:
        """The divergence check's verdict on ``norm`` (Σ_p ‖∇Ũ_p‖ + 0·loss), and its bookkeeping when finite."""
        if math.isfinite(norm):
            self._divergences = 0
            self._grad_norm_first = norm if self._grad_norm_first is None else self._grad_norm_first
            self._grad_norm_last = norm
            return True
        return False

    def _set_stats(self, first: dict[str, Any], phase: tuple[float, float, bool] | None, evals: Any,
                   noise_ratio: float, own_stats: dict[str, float], lp: float | None, info: dict[str, Any],
                   diverging: bool) -> None:
        """``stats`` of the step just made: ``first`` is the first param group's effective options."""
        self.stats = {"step_size": float(first["lr"]),
                      "grad_evals": float("nan") if evals is None else float(evals),
                      "noise_ratio": noise_ratio}
        if phase is not None:
            self.stats["temperature"] = float(first["temperature"])
            self.stats["sampling_phase"] = float(phase[2])
        self.stats.update(own_stats)
        if lp is not None:
            self.stats["lp"] = lp
        self.stats.update({k: float(v) for k, v in info.items()})
        self.stats["diverging"] = diverging

    def _diverged(self, loss: Any) -> None:
        self._divergences += 1
        self.stats["lp"] = math.nan
        if self._divergences < self.max_divergences:
            return
        what = "the loss" if loss is not None and not math.isfinite(float(loss)) else "the gradient estimate"
        first, last = self._grad_norm_first, self._grad_norm_last
        if first is None:
            history = "no step of this chain was ever finite"
        else:
            history = f"the gradient norm went from {first:.3g} at the first step to {last:.3g} at the last finite one"
        raise DivergenceError(
            f"{type(self).__name__}: {self._divergences} steps in a row gave a non-finite {what} (NaN or inf), "
            f"so each was skipped and the parameters kept; {history}. Likely causes: non-finite data (a NaN or inf "
            "in any example poisons every batch that holds it: check torch.isfinite(x).all() for each data tensor), "
            f"or a step size too large (lr={self.param_groups[0]['lr']:.3g}: a norm that grew by orders of "
            "magnitude says so; divide lr by 10). Set max_divergences= to tolerate longer runs of them")

    def _noise_ratio(self, noise_var: torch.Tensor | None, phase: tuple[float, float, bool] | None = None) -> float:
        """Σ_p a_p·Var_p / Σ_p b_p over the parameters with an estimate, (a_p, b_p) from `_noise_terms`: the
        variance the gradient estimate's noise adds in one step over the variance of the injected noise
        (``noise_var`` per trainable parameter, from the estimator). NaN where it cannot be estimated."""
        if noise_var is None:
            return math.nan
        num = den = 0.0
        k = 0
        noise_var = noise_var.tolist()  # one host read, not one per parameter
        for group in self.param_groups:
            eff = self._effective(group, phase)
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                var = float(noise_var[k])
                k += 1
                if math.isfinite(var):
                    a, b = self._noise_terms(eff, p)
                    num += a * var
                    den += b
        if den == 0.0:
            return math.inf if num > 0 else math.nan
        return num / den

    # -- what a diffusion provides ------------------------------------------------------------------------

    extra_stats: tuple[str, ...] = ()  # the diffusion's own entries of ``stats`` (NaN on a skipped step)

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                group: dict[str, Any]) -> dict[str, float]:
        """Moves ``params`` in place given ``grads`` = ∇Ũ (estimate + prior) for one param group; ``states`` are
        the parameters' ``self.state`` entries and ``group`` the group's options with the schedule applied
        (``lr``, ``temperature``). Returns the diffusion's own stats (summed over groups by the caller's
        ``update``: return per-group values under distinct keys or aggregate yourself). Here: Langevin, with
        torch.optim.SGD's heavy ball when ``momentum`` > 0 (see the module docstring)."""
        if group["momentum"]:
            for state, p in zip(states, params):
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
            bufs = [state["momentum_buffer"] for state in states]
        else:
            bufs = [None] * len(params)
        langevin_update(params, grads, bufs, lr=group["lr"], temperature=group["temperature"],
                        momentum=group["momentum"], nesterov=group["nesterov"], generator=self.generator)
        return {}

    def _noise_terms(self, group: dict[str, Any], p: torch.Tensor) -> tuple[float, float]:
        """(a, b) for parameter ``p``: a·Var(v) is the variance (summed over p's coordinates) that the estimate's
        noise Var(v) adds to the diffused variable in one step, b the injected noise's. Langevin: a = h²,
        b = 2(1−μ)·h·T·n."""
        h, temp, mu = group["lr"], group["temperature"], group["momentum"]
        return h * h, 2.0 * (1.0 - mu) * h * temp * p.numel()

    # -- schedules ----------------------------------------------------------------------------------------

    def _schedule_phase(self) -> tuple[float, float, bool] | None:
        """(step-size factor, temperature factor, sampling phase) of the schedule at this step (0-based: the
        step about to be made), or None without a schedule."""
        if self.schedule is None:
            return None
        return self.schedule(self._steps - 1)

    @staticmethod
    def _effective(group: dict[str, Any], phase: tuple[float, float, bool] | None) -> dict[str, Any]:
        if phase is None:
            return group
        return {**group, "lr": group["lr"] * phase[0], "temperature": group["temperature"] * phase[1]}

    def initialize(self, loader: Iterable, loss_fn: Callable[..., torch.Tensor]) -> None:
        """Fill the estimator's table by one pass over ``loader`` (SAGA/SAG only)."""
        if not hasattr(self.estimator, "initialize"):
            raise TypeError(f"{self.estimator!r} has nothing to initialize")
        self.estimator.initialize(loader, loss_fn)

    def state_dict(self) -> dict[str, Any]:
        state = state_to_plain(super().state_dict(), self.generator)
        state["estimator"] = self.estimator.state_dict()
        state["steps"] = self._steps
        state["divergences"] = self._divergences
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict, generator = state_from_plain(state_dict)
        estimator = state_dict.pop("estimator", None)
        self._steps = int(state_dict.pop("steps", 0))
        self._divergences = int(state_dict.pop("divergences", 0))
        super().load_state_dict(state_dict)
        if estimator is not None:
            self.estimator.load_state_dict(estimator)
        restore_generator(self.generator, generator)
