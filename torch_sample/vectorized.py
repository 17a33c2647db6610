"""One step of C chains of a stochastic-gradient diffusion on stacked parameters: what C calls of the samplers'
``step`` do, as a few tensor operations.

`vr_mcmc.sample(..., chain_method="vectorized")` builds a `StackedStep` for chains whose samplers it `fits`:
SGLD and SAGA-LD (Langevin, with or without heavy-ball momentum), SGHMC, pSGLD and SGNHT, with the minibatch
estimate or SAGA's (its tables stacked by `vr_mcmc.estimators.stacked_saga`), schedules (cSGLD, cSGHMC) applied
per chain. Each chain keeps its sampler (its options, step counter, stats, generator, state dict); its parameters
are slices of the stacked tensors, and so are its sampler's state
tensors (momentum, RMSprop's average), so a chain's own ``step`` (the per-chain fallback) and its state dict see
what the stacked steps did. With ∇Ũ = v + ∇(−log p(θ)), v the estimate of the data term, the diffusions are their
samplers' (see each class): each chain with its own h, T, prior and options, its noise drawn from its own generator
(or its own state of the torch RNG, given as ``rng``) in the order its sequential step draws it, so each chain's
step is the step its sampler makes alone, up to float rounding of the batched sums. A step with a non-finite
gradient or loss in any chain is not made here (False is returned; the caller then steps each sampler itself,
which skips and counts the divergence as usual).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from vr_mcmc.estimators.minibatch import Minibatch

from .langevin import LangevinSampler
from .priors import Flat, Laplace, Normal, Prior
from .psgld import PSGLD
from .sagald import SAGALD
from .sghmc import SGHMC
from .sgld import SGLD
from .sgnht import SGNHT

__all__ = ["StackedStep", "fits", "log_prob_rows"]


def _estimate_kind(sampler: LangevinSampler) -> str | None:
    """"minibatch" (N·∇ of the batch mean), "saga" (the stacked tables'), or None: an estimate computed per
    chain (a closure estimator, another table)."""
    from vr_mcmc.estimators.saga import SAGA

    estimator = sampler.estimator
    if type(estimator) is Minibatch:
        return "minibatch"
    if type(estimator) is SAGA:
        return "saga"
    return None


def fits(sampler: torch.optim.Optimizer) -> str | None:
    """Which estimate a `StackedStep` can make this sampler's step with ("minibatch" or "saga"), or None: it needs a
    diffusion of `STACKS` with its plain options (see each), one param group, a mean loss, every parameter
    trainable, and an estimate that `_estimate_kind` names (a schedule, e.g. cSGHMC's, is applied per chain)."""
    stack = STACKS.get(type(sampler))
    if stack is None or len(sampler.param_groups) != 1:
        return None
    group = sampler.param_groups[0]
    plain = (sampler.check_finite and sampler.loss_reduction == "mean"
             and all(p.requires_grad for p in group["params"]) and stack.plain(sampler, group))
    return _estimate_kind(sampler) if plain else None


def log_prob_rows(prior: Prior, param: torch.Tensor) -> torch.Tensor:
    """[C]: ``prior.log_prob(param[c])`` for each slice c of a stacked parameter, without a loop for the priors of
    `torch_sample.priors` (the same formulas, summed per slice: the same floats as a chain's own step, so a chain
    that steps alone after a resume records what the stacked step would)."""
    c, n = param.shape[0], param[0].numel()
    rows = param.reshape(c, -1)
    if type(prior) is Normal:
        z = (rows - prior.mean if prior.mean else rows) / prior.std  # θ − 0 is θ: one pass fewer
        return -0.5 * (z * z).sum(1) - n * (math.log(prior.std) + 0.5 * math.log(2 * math.pi))
    if type(prior) is Laplace:
        return -(rows - prior.loc).abs().sum(1) / prior.scale - n * math.log(2 * prior.scale)
    if type(prior) is Flat:
        return rows.new_zeros(c, dtype=torch.promote_types(rows.dtype, torch.float32))
    return torch.stack([prior.log_prob(param[k]) for k in range(c)])


def _log_prob_all(prior: Prior, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[P, C]: `log_prob_rows` of every parameter; for a Normal prior the per-slice sums of z² first, then the
    constant terms for all parameters in one operation (the same float32 arithmetic: a Python constant is rounded
    to the tensor's float32 as the [P, 1] constant is)."""
    if type(prior) is not Normal or len({p.dtype for p in params}) != 1:
        return torch.stack([log_prob_rows(prior, p).to(torch.float64) for p in params])
    c = params[0].shape[0]
    sums = []
    for p in params:
        rows = p.reshape(c, -1)
        z = (rows - prior.mean if prior.mean else rows) / prior.std
        sums.append((z * z).sum(1))
    half_log = math.log(prior.std) + 0.5 * math.log(2 * math.pi)
    consts = torch.tensor([[p[0].numel() * half_log] for p in params], dtype=params[0].dtype,
                          device=params[0].device)
    return -0.5 * torch.stack(sums) - consts


def _per_chain(values: Sequence[float], like: torch.Tensor) -> float | torch.Tensor:
    """One number for every chain: itself when the chains agree (the sequential step's scalar operations), else a
    [C, 1, ...] tensor that broadcasts over each chain's slice."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def _axpy_(y: torch.Tensor, x: torch.Tensor, a: float | torch.Tensor) -> torch.Tensor:
    """y ← y + a·x, per chain when ``a`` is a [C, 1, ...] tensor."""
    return y.add_(x, alpha=a) if isinstance(a, float) else y.addcmul_(x, a)


def _sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[C]: Σ over the tensors of each chain's squared norm, in the sequential step's float32 order
    (``sum(n * n for n in _foreach_norm(slices))``; a row's norm is its slice's, bit for bit)."""
    c = tensors[0].shape[0]
    norms = [torch.linalg.vector_norm(t.reshape(c, -1), dim=1) for t in tensors]
    total = norms[0] * norms[0]
    for n in norms[1:]:
        total = total + n * n
    return total


class StackedStep:
    """The step of C chains of one diffusion (the base: the prior, the divergence check, the noise, the samplers'
    bookkeeping); subclasses give the update. ``params[j]``: the stacked [C, ...] tensor of which chain c's j-th
    parameter (in its param group's order) is slice c."""

    sampler_type: type = LangevinSampler

    def __init__(self, samplers: Sequence[LangevinSampler], params: Sequence[torch.Tensor]):
        self.samplers = list(samplers)
        self.params = list(params)
        self.groups = [s.param_groups[0] for s in self.samplers]
        self.eff = list(self.groups)  # the groups' options with each chain's schedule applied, for this step
        self._states: dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._noise_buffers: tuple[list[torch.Tensor], list[list[torch.Tensor]]] | None = None

    @staticmethod
    def plain(sampler: LangevinSampler, group: dict) -> bool:
        """Whether this diffusion's options are the ones `update` makes."""
        return True

    def ready(self) -> bool:
        """Whether the chains' states allow one stacked step now (else each sampler steps itself)."""
        return True

    # -- per-chain state tensors, stacked ---------------------------------------------------------------------

    def state(self, j: int, key: str, init: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor | None:
        """[C, ...]: every chain's ``sampler.state[p_j][key]``, each chain's entry a view of its slice (re-stacked
        when a chain replaced its tensor: its own step, a resume); a chain without one gets ``init(c)`` (None:
        returns None unless every chain has one)."""
        states = [s.state[g["params"][j]] for s, g in zip(self.samplers, self.groups)]
        cached = self._states.get((j, key))
        if cached is not None and all(st.get(key) is v for st, v in zip(states, cached[1])):
            return cached[0]
        have = [st.get(key) for st in states]
        if any(h is None for h in have):
            if init is None:
                return None
            have = [init(k) if h is None else h for k, h in enumerate(have)]
        stacked = torch.stack(have)
        views = [stacked[k] for k in range(len(states))]
        for st, v in zip(states, views):
            st[key] = v
        self._states[(j, key)] = (stacked, views)
        return stacked

    # -- one step ---------------------------------------------------------------------------------------------

    def diagnosed(self) -> list[bool]:
        """Per chain: whether its sampler measures ``noise_ratio`` at the step about to be made."""
        return [bool(s.noise_ratio_every) and s._steps % s.noise_ratio_every == 0 for s in self.samplers]

    @torch.no_grad()
    def step(self, est: Sequence[torch.Tensor], loss: torch.Tensor, batch_size: int, rng: list[torch.Tensor],
             commit: Callable[[], None] | None = None, noise_var: torch.Tensor | None = None) -> bool:
        """One step of every chain. ``est[j]``: the estimates of the data term of ∇U for ``params[j]`` (new tensors:
        the prior's gradient is added in place), from the chains' batch mean losses ``loss`` [C]; ``rng[c]``:
        chain c's torch RNG state (used when its sampler has no generator; updated). ``commit``: called once the
        step is known finite, before the update (the estimator's own state change, e.g. SAGA's table update).
        ``noise_var`` [C, P]: the estimator's noise variance per chain and parameter (`diagnosed` chains' are
        turned into their ``noise_ratio``, as their own steps would)."""
        samplers, params, groups = self.samplers, self.params, self.groups
        c = loss.shape[0]
        est = list(est)
        neg_log_prior = torch.zeros(c, dtype=torch.float64)
        priors = [g["prior"] for g in groups]
        if all(p == priors[0] for p in priors):
            prior = priors[0]
            if prior is not None:
                for p, g in zip(params, est):
                    prior.add_grad_(p, g)
                for row in _log_prob_all(prior, params).to(torch.float64):  # Σ in the sequential step's order
                    neg_log_prior -= row
        else:  # chains with different priors: each its own slice
            for k, prior in enumerate(priors):
                if prior is not None:
                    for p, g in zip(params, est):
                        prior.add_grad_(p[k], g[k])
                        neg_log_prior[k] -= float(prior.log_prob(p[k]))
        # the divergence check of LangevinSampler._finite, per chain: Σ_p ‖∇Ũ_p‖ + 0·loss
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(c, -1), dim=1) for g in est]).sum(0)
        norms = norms + loss.detach() * 0
        lp = -(loss.detach().to(torch.float64) * samplers[0].num_data + neg_log_prior)
        host = torch.stack([norms.to(torch.float64), lp]).tolist()  # the one synchronization
        norms_list, lp_list = host
        if not all(math.isfinite(n) for n in norms_list):
            return False
        if commit is not None:
            commit()
        diagnosed = self.diagnosed() if noise_var is not None else [False] * c
        phases = []
        for sampler in samplers:  # the step counts itself before its schedule's phase is read, as sequential
            sampler._count_step()
            phases.append(sampler._schedule_phase())
        self.eff = [s._effective(g, ph) for s, g, ph in zip(samplers, groups, phases)]
        for k, sampler in enumerate(samplers):
            if diagnosed[k]:  # before the update, as the sequential step (SGHMC's beta="auto" reads it)
                sampler._last_noise_var = noise_var[k]
        noise = self._noise(rng)
        own = self.update(est, noise)
        for k, sampler in enumerate(samplers):
            sampler._loss_checked = True
            sampler._finite_norm(norms_list[k])
            extra = {key: float(values[k]) for key, values in own.items()}
            ratio = math.nan
            if diagnosed[k]:  # after the update, as the sequential step (pSGLD's terms read the new V)
                ratio = sampler._noise_ratio(noise_var[k], phases[k])
            sampler._set_stats(self.eff[k], phases[k], batch_size, ratio, extra, lp_list[k], {}, False)
        return True

    def _noise(self, rng: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """ξ per parameter, [C, ...] (None where no chain draws; zeros in a chain's slice where it does not): chain
        c's draws from its own generator or RNG state, in its sequential step's order (parameter by parameter)."""
        draws = [self.draws(k) for k in range(len(self.samplers))]
        if self._noise_buffers is None:  # reused every step (a step's noise is spent within it)
            buffers = [torch.empty_like(p) for p in self.params]
            self._noise_buffers = (buffers, [[b[k] for b in buffers] for k in range(len(self.samplers))])
        buffers, views = self._noise_buffers
        noise: list[torch.Tensor | None] = []
        for j, xi in enumerate(buffers):
            wanted = [d[j] for d in draws]
            noise.append(None if not any(wanted) else xi if all(wanted) else xi.zero_())
        for k, sampler in enumerate(self.samplers):
            if not any(draws[k]):
                continue
            generator = sampler.generator
            if generator is None:
                torch.set_rng_state(rng[k])
            for j, xi in enumerate(noise):
                if draws[k][j]:
                    if generator is None or generator.device == xi.device:
                        views[k][j].normal_(generator=generator)  # randn_like's draws, in place
                    else:  # a CPU generator driving chains elsewhere, as _shared.gaussian_noise
                        xi[k].copy_(torch.randn(xi[k].shape, generator=generator, device=generator.device,
                                                dtype=xi.dtype))
            if generator is None:
                rng[k] = torch.get_rng_state()
        return noise

    # -- what a diffusion provides ------------------------------------------------------------------------------

    def draws(self, k: int) -> list[bool]:
        """Per parameter: whether chain k's step draws noise for it."""
        return [self.eff[k]["temperature"] > 0] * len(self.params)

    def update(self, grads: list[torch.Tensor], noise: list[torch.Tensor | None]) -> dict[str, list[float]]:
        """Moves the stacked parameters given ``grads`` = ∇Ũ; returns the diffusion's own stats per chain."""
        raise NotImplementedError


class LangevinStack(StackedStep):
    """SGLD / SAGA-LD (`LangevinSampler`): θ ← θ − h·∇Ũ + √(2hT)·ξ; with ``momentum`` μ torch.optim.SGD's heavy ball
    b ← μ·b + ∇Ũ − √(2(1−μ)hT)/h·ξ, θ ← θ − h·b (Nesterov: θ ← θ − h·(∇Ũ + μ·b), at T = 0)."""

    sampler_type = LangevinSampler

    def ready(self):
        # chains agree on whether they have momentum (and Nesterov): a zero μ is another sequence of operations
        kinds = {(bool(g["momentum"]), bool(g["nesterov"])) for g in self.groups}
        return len(kinds) == 1

    def update(self, grads, noise):
        lrs = [float(g["lr"]) for g in self.eff]
        mus = [float(g["momentum"]) for g in self.eff]
        scales = [math.sqrt(2.0 * h * g["temperature"] * (1.0 - mu)) if g["temperature"] > 0 else 0.0
                  for h, g, mu in zip(lrs, self.eff, mus)]
        if not mus[0]:
            for p, g, xi in zip(self.params, grads, noise):
                _axpy_(p, g, _per_chain([-h for h in lrs], p))
                if xi is not None:
                    _axpy_(p, xi, _per_chain(scales, p))
            return {}
        nesterov = self.eff[0]["nesterov"]
        for j, (p, g, xi) in enumerate(zip(self.params, grads, noise)):
            b = self.state(j, "momentum_buffer", lambda k, p=p: torch.zeros_like(p[k]))
            mu = _per_chain(mus, p)
            b.mul_(mu)
            b.add_(g)
            if xi is not None:  # velocity u = −h·b gets √(2(1−μ)hT)·ξ
                _axpy_(b, xi, _per_chain([-s / h for s, h in zip(scales, lrs)], p))
            d = (torch.add(g, b, alpha=mu) if isinstance(mu, float) else g + b * mu) if nesterov else b
            _axpy_(p, d, _per_chain([-h for h in lrs], p))
        return {}


class SGHMCStack(StackedStep):
    """`SGHMC`: r ← (1 − hα)·r − h·∇Ũ + √(hT(2α − hβ))·ξ, θ ← θ + h·r, with β a number or (``beta="auto"``) each
    chain's own estimate per parameter (`SGHMC._beta`, from its latest noise diagnostic)."""

    sampler_type = SGHMC

    def _vars(self, k: int) -> list[float]:
        """Chain k's injected variance per parameter, h·T·(2α − h·β)."""
        g, sampler = self.eff[k], self.samplers[k]
        return [g["lr"] * g["temperature"] * (2.0 * g["friction"] - g["lr"] * sampler._beta(g, p))
                for p in self.groups[k]["params"]]

    def draws(self, k):
        return [self.eff[k]["temperature"] > 0 and v > 0 for v in self._vars(k)]

    def update(self, grads, noise):
        h = [float(g["lr"]) for g in self.eff]
        damp = [1.0 - g["lr"] * g["friction"] for g in self.eff]
        sd = [[math.sqrt(v) if drawn else 0.0 for v, drawn in zip(self._vars(k), self.draws(k))]
              for k in range(len(h))]
        moms = []
        for j, (p, g, xi) in enumerate(zip(self.params, grads, noise)):
            r = self.state(j, "momentum", lambda k, p=p: torch.zeros_like(p[k]))
            d = _per_chain(damp, p)
            r.mul_(d)
            _axpy_(r, g, _per_chain([-x for x in h], p))
            if xi is not None:
                _axpy_(r, xi, _per_chain([chain[j] for chain in sd], p))
            moms.append(r)
        for p, r in zip(self.params, moms):
            _axpy_(p, r, _per_chain(h, p))
        return {"kinetic_energy": (0.5 * _sq_norms(moms)).tolist()}


class PSGLDStack(StackedStep):
    """`PSGLD` without the Γ correction: V ← αV + (1−α)∇Ũ² (∇Ũ² at the first step; kept when frozen),
    G = 1/(ε + √V), θ ← θ − h·G⊙∇Ũ + √(2hT)·√G⊙ξ."""

    sampler_type = PSGLD

    @staticmethod
    def plain(sampler, group):
        return not group["correction"]

    def ready(self):
        frozen = {s.preconditioner_frozen for s in self.samplers}
        started = {"square_avg" in s.state[g["params"][0]] for s, g in zip(self.samplers, self.groups)}
        return len(frozen) == 1 and len(started) == 1  # the chains agree (lockstep chains always do)

    def update(self, grads, noise):
        frozen = self.samplers[0].preconditioner_frozen
        h = [float(g["lr"]) for g in self.eff]
        scales = [math.sqrt(2.0 * x * g["temperature"]) if g["temperature"] > 0 else 0.0
                  for x, g in zip(h, self.eff)]
        c = len(self.samplers)
        total = torch.zeros(c, dtype=torch.float64)
        count = 0
        for j, (p, g, xi) in enumerate(zip(self.params, grads, noise)):
            v = self.state(j, "square_avg")
            if v is None:
                v = self.state(j, "square_avg", lambda k, g=g: g[k] * g[k])
            elif not frozen:
                a = _per_chain([float(gr["alpha"]) for gr in self.eff], p)
                if isinstance(a, float):
                    v.mul_(a).addcmul_(g, g, value=1.0 - a)
                else:
                    v.mul_(a).add_(g * g * (1.0 - a))
            eps = _per_chain([float(gr["eps"]) for gr in self.eff], p)
            precond = (v.sqrt() + eps).reciprocal_()
            if isinstance(h_c := _per_chain([-x for x in h], p), float):
                p.addcmul_(precond, g, value=h_c)
            else:
                p.add_(precond * g * h_c)
            if xi is not None:
                s = _per_chain(scales, p)
                if isinstance(s, float):
                    p.addcmul_(precond.sqrt(), xi, value=s)
                else:
                    p.add_(precond.sqrt() * xi * s)
            total += precond.reshape(c, -1).sum(1).to(torch.float64)
            count += p[0].numel()
        return {"preconditioner": (total / max(count, 1)).tolist()}


class SGNHTStack(StackedStep):
    """`SGNHT`: r ← r − hξ·r − h·∇Ũ + √(2AhT)·η, θ ← θ + h·r, ξ ← ξ + h(|r|²/P − T), one thermostat ξ per chain."""

    sampler_type = SGNHT

    def update(self, grads, noise):
        head = [s.state[g["params"][0]] for s, g in zip(self.samplers, self.eff)]
        xi = [float(st.setdefault("thermostat", float(g["friction"]))) for st, g in zip(head, self.eff)]
        h = [float(g["lr"]) for g in self.eff]
        scales = [math.sqrt(2.0 * g["friction"] * g["lr"] * g["temperature"]) if g["temperature"] > 0 else 0.0
                  for g in self.eff]
        moms = []
        for j, (p, g, eta) in enumerate(zip(self.params, grads, noise)):
            r = self.state(j, "momentum", lambda k, p=p: torch.zeros_like(p[k]))
            r.mul_(_per_chain([1.0 - x * t for x, t in zip(h, xi)], p))
            _axpy_(r, g, _per_chain([-x for x in h], p))
            if eta is not None:
                _axpy_(r, eta, _per_chain(scales, p))
            moms.append(r)
        for p, r in zip(self.params, moms):
            _axpy_(p, r, _per_chain(h, p))
        sq = _sq_norms(moms).tolist()
        size = sum(p[0].numel() for p in self.params)
        thermostat = []
        for k, st in enumerate(head):
            st["thermostat"] = xi[k] + h[k] * (sq[k] / size - self.eff[k]["temperature"])
            thermostat.append(st["thermostat"])
        return {"kinetic_energy": [0.5 * x for x in sq], "thermostat": thermostat}


# the sampler classes whose steps a stack makes (exact types: a subclass may change the step)
STACKS: dict[type, type[StackedStep]] = {SGLD: LangevinStack, SAGALD: LangevinStack, SGHMC: SGHMCStack,
                                         PSGLD: PSGLDStack, SGNHT: SGNHTStack}
