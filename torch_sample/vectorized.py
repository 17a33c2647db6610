"""One Langevin step of C chains on stacked parameters: what C calls of `SGLD.step` (or `SAGALD.step`) do, as a
few tensor operations.

`vr_mcmc.sample(..., chain_method="vectorized")` calls `langevin_step` for chains whose samplers are plain SGLD or
SAGA-LD (`fits`): each chain keeps its sampler (its options, step counter, stats, generator, state dict), and its
parameters are slices of the stacked tensors. Math as `langevin.LangevinSampler`: ∇Ũ = v + ∇(−log p(θ)) with v
the estimate of the data term (N·∇(batch mean NLL) for SGLD, SAGA's for SAGA-LD), θ ← θ − h·∇Ũ + √(2hT)·ξ, with
each chain's own h, T and prior, and its noise ξ drawn from its own generator (or its own state of the torch RNG,
given as ``rng``) in the order a sequential step draws it, so each chain's step is the step its sampler makes
alone, up to float rounding of the batched sums. A step with a non-finite gradient or loss in any chain is not
made here (False is returned; the caller then steps each sampler itself, which skips and counts the divergence as
usual).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from vr_mcmc.estimators.minibatch import Minibatch

from ._shared import gaussian_noise
from .langevin import LangevinSampler
from .priors import Flat, Laplace, Normal, Prior
from .sagald import SAGALD
from .sgld import SGLD

__all__ = ["fits", "langevin_step", "log_prob_rows"]


def fits(sampler: torch.optim.Optimizer) -> str | None:
    """Which estimate `langevin_step` can make this sampler's step with ("minibatch": SGLD; "saga": SAGA-LD, its
    table stacked by `vr_mcmc.estimators.stacked_saga`), or None: it needs the Langevin diffusion with no momentum,
    no schedule, one param group, a mean loss, and no per-example noise diagnostic (``noise_ratio_every=0``, or no
    engine for SGLD)."""
    if not isinstance(sampler, LangevinSampler) or len(sampler.param_groups) != 1:
        return None
    group = sampler.param_groups[0]
    plain = (not group["momentum"] and sampler.schedule is None and sampler.check_finite
             and sampler.loss_reduction == "mean" and all(p.requires_grad for p in group["params"]))
    if not plain:
        return None
    if type(sampler) is SGLD and type(sampler.estimator) is Minibatch:
        diagnosed = sampler.estimator.engine is not None and sampler.noise_ratio_every
        return None if diagnosed else "minibatch"
    if type(sampler) is SAGALD and not sampler.noise_ratio_every:
        return "saga"
    return None


def log_prob_rows(prior: Prior, param: torch.Tensor) -> torch.Tensor:
    """[C]: ``prior.log_prob(param[c])`` for each slice c of a stacked parameter, without a loop for the priors of
    `torch_sample.priors` (the same formulas, summed per slice)."""
    c, n = param.shape[0], param[0].numel()
    rows = param.reshape(c, -1)
    if type(prior) is Normal:
        z = (rows - prior.mean) / prior.std
        return -0.5 * (z * z).sum(1) - n * (math.log(prior.std) + 0.5 * math.log(2 * math.pi))
    if type(prior) is Laplace:
        return -(rows - prior.loc).abs().sum(1) / prior.scale - n * math.log(2 * prior.scale)
    if type(prior) is Flat:
        return rows.new_zeros(c, dtype=torch.promote_types(rows.dtype, torch.float32))
    return torch.stack([prior.log_prob(param[k]) for k in range(c)])


@torch.no_grad()
def langevin_step(samplers: Sequence[LangevinSampler], params: Sequence[torch.Tensor], est: Sequence[torch.Tensor],
                  loss: torch.Tensor, batch_size: int, rng: list[torch.Tensor],
                  commit: Callable[[], None] | None = None) -> bool:
    """One step of every chain. ``params[j]``: the stacked [C, ...] tensor of which chain c's j-th parameter (in
    its param group's order) is slice c; ``est[j]``: the estimates of the data term of ∇U (new tensors: the prior's
    gradient is added in place), from the chains' batch mean losses ``loss`` [C]; ``rng[c]``: chain c's torch RNG
    state (used when its sampler has no generator; updated). ``commit``: called once the step is known finite,
    before the update (the estimator's own state change, e.g. SAGA's table update)."""
    c = loss.shape[0]
    groups = [s.param_groups[0] for s in samplers]
    num_data = samplers[0].num_data
    est = list(est)
    neg_log_prior = torch.zeros(c, dtype=torch.float64)
    priors = [g["prior"] for g in groups]
    if all(p == priors[0] for p in priors):
        prior = priors[0]
        if prior is not None:
            for p, g in zip(params, est):
                prior.add_grad_(p, g)
                neg_log_prior -= log_prob_rows(prior, p).to(torch.float64)
    else:  # chains with different priors: each its own slice
        for k, prior in enumerate(priors):
            if prior is not None:
                for p, g in zip(params, est):
                    prior.add_grad_(p[k], g[k])
                    neg_log_prior[k] -= float(prior.log_prob(p[k]))
    # the divergence check of LangevinSampler._finite, per chain: Σ_p ‖∇Ũ_p‖ + 0·loss
    norms = torch.stack([g.reshape(c, -1).norm(dim=1) for g in est]).sum(0) + loss.detach() * 0
    if not bool(torch.isfinite(norms).all()):
        return False
    if commit is not None:
        commit()
    lrs = [float(g["lr"]) for g in groups]
    scales = [math.sqrt(2.0 * h * g["temperature"]) if g["temperature"] > 0 else 0.0 for h, g in zip(lrs, groups)]
    noise: list[list[torch.Tensor]] = [[] for _ in params]
    for k, sampler in enumerate(samplers):
        if not scales[k]:  # T = 0: no draw (as the sequential step), zeros in its slice
            for j, p in enumerate(params):
                noise[j].append(torch.zeros_like(p[k]))
            continue
        if sampler.generator is None:
            torch.set_rng_state(rng[k])
        for j, p in enumerate(params):
            noise[j].append(gaussian_noise(p[k], sampler.generator))
        if sampler.generator is None:
            rng[k] = torch.get_rng_state()
    same = len(set(lrs)) == 1 and len(set(scales)) == 1
    for j, (p, g) in enumerate(zip(params, est)):
        xi = torch.stack(noise[j])
        if same:  # the sequential step's own operations: p ← p − h·g, p ← p + s·ξ
            p.add_(g, alpha=-lrs[0])
            if scales[0]:
                p.add_(xi, alpha=scales[0])
        else:
            shape = (c,) + (1,) * (p.dim() - 1)
            p.addcmul_(g, torch.tensor(lrs, dtype=p.dtype, device=p.device).reshape(shape), value=-1.0)
            p.addcmul_(xi, torch.tensor(scales, dtype=p.dtype, device=p.device).reshape(shape))
    lp = -(loss.detach().to(torch.float64) * num_data + neg_log_prior)
    norms_list, lp_list = norms.tolist(), lp.tolist()
    for k, sampler in enumerate(samplers):
        sampler._steps += 1
        sampler._loss_checked = True
        sampler._divergences = 0
        if sampler._grad_norm_first is None:
            sampler._grad_norm_first = norms_list[k]
        sampler._grad_norm_last = norms_list[k]
        sampler.stats = {"step_size": lrs[k], "grad_evals": float(batch_size), "noise_ratio": math.nan,
                         "lp": lp_list[k], "diverging": False}
    return True
