"""Variance reduction for SG-MCMC: statistical efficiency per data pass, and the cost of a SAGA-LD step.

(A) efficiency. Bayesian logistic regression on scikit-learn's breast-cancer data (bundled, no
download): N = 569 examples, 30 standardized features + an intercept, d = 31 parameters, prior
N(0, σ²) on every parameter (``--prior-std``, one comparison per value), float64, CPU, 1 thread.
Target π(θ) ∝ exp(−U), U = −log p(θ) − Σ_i log p(y_i | x_i, θ).

- Reference posterior: MALA written here (full-data log density and gradient in numpy float64),
  preconditioned by the Laplace covariance H⁻¹ (H: the Hessian of U at the MAP, found by Newton's
  method). A fixed preconditioner keeps MALA exact; it only takes the curvature spread of H
  (85:1 for σ = 1) out of the step size. ``--ref-chains`` chains start from the Laplace
  approximation widened 1.5×; the step is tuned during warm-up (Robbins–Monro on log ε) to an
  acceptance of 0.574, then frozen. Printed: acceptance, bulk ESS and R-hat (arviz), and the Monte
  Carlo error of the reference mean in posterior sds (1/√ESS: the floor of the error measures).
- Samplers: SGLD, SAGA-LD (table rows start at zero: no initialization pass), SVRG-LD
  (snapshot_every = one epoch) and SGLD-CV, all at the same step size h and batch size B, from
  θ = 0, on the same seeded batches and noise generator seed per repeat. SGLD-CV's centre is the
  MAP found by full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search, from θ = 0, until
  the largest gradient entry of U/N is below ``--centre-tol``); each of its function evaluations is
  counted as a pass of SGLD-CV, whose chain starts at the centre. (The SAGA optimizer,
  ``SAGALD(temperature=0)``, was tried first: at the sampler's h = 0.0088 it does not converge for
  σ = 1 (0.35-0.8 sd from the MAP at 10 to 200 passes, in a numpy reimplementation too); at
  h = 0.001 it does, in about 100 passes.)
- h: ``--lr``, or by default ``--step-fraction`` / λmax(H) (0.75: SGLD is stable, since a full-
  gradient step needs h·λmax < 2, and its gradient noise is visible). Also printed: the error of
  exact-gradient Langevin (ULA: the full batch every step) at the same h after as many steps as
  SGLD took, i.e. what is left without any gradient noise (discretization bias + Monte Carlo error).
- Cost axis: data passes = Σ over steps of ``sampler.stats["grad_evals"]`` / N (SVRG-LD and SGLD-CV
  pay 2B per step plus N per full gradient).
- Errors at a checkpoint of p passes, from the iterates after every step done within p passes,
  less the first ``--burn-in`` fraction (default 10%) of those p passes, against the reference
  mean m and standard deviations s (j runs over the d coordinates):
      mean error     = sqrt(mean_j ((m̂_j − m_j) / s_j)²)     (RMS standardized error of the mean)
      variance error = sqrt(mean_j (v̂_j / s_j² − 1)²)        (RMS relative error of the variances)
  Both are averaged over ``--repeats`` independent repeats (seeds seed, seed+1, ...).
- Headline: the passes SAGA-LD needs to reach SGLD's error after the whole budget, as a fraction of
  that budget: the first checkpoint from which SAGA-LD's averaged error stays at or below SGLD's
  final averaged error (target ≤ 1/3). The same is printed for SVRG-LD and SGLD-CV.

Choice of the settings. A development scan (B = 32, 200 passes, 3 repeats, 10,000 reference draws
per chain; h = c/λmax) gave these fractions of SGLD's passes for SAGA-LD, mean / variance error
("-": never within the budget):

    σ       c = 0.25      c = 0.5       c = 0.75      c = 1.0
    0.1     0.83 / 0.80   0.73 / 0.20   0.55 / 0.08   0.35 / 0.03
    0.2     0.78 / 1.00   0.70 / 0.65   0.40 / 0.18   0.28 / -
    0.5     0.80 / -      0.80 / -         - / -         - / -
    1.0     0.88 / -         - / -         - / -         - / -

Variance reduction needs per-example gradients that change little across the posterior: the
estimators subtract g_i at a stale point (SAGA-LD: where example i was last visited, about an
epoch ago; SVRG-LD: the last snapshot) or at the mode (SGLD-CV) from g_i at θ. With σ = 1 this
nearly separable data set leaves a wide posterior (sds 0.4-0.9; the posterior sd of a logit has a
median of 1.35 over the examples, against 0.47 for σ = 0.2), where those differences are nearly as
variable as g_i itself (along the stiffest direction of H, for θ and the stale point drawn
independently from the Laplace approximation: 80% of the variance of g_i with σ = 1, 33% with
σ = 0.2; at the mode 50% and 20%). At large h the stale differences also grow with the chain's own
spread, and SAGA-LD ends up worse than SGLD (reproduced by a separate numpy implementation of the
same updates, so the method, not the code). The defaults run σ = 0.1 and 0.2 (where the comparison
is informative) and σ = 1 (the weak prior, for contrast), all with c = 0.75. The mean error is
mostly Monte Carlo error, which variance reduction at a fixed h does not shrink (the chains mix at
the same rate); the variance error is where SGLD's gradient noise shows. The headline compares
where two curves flatten out, so it is fragile when their plateaus are close: for σ = 0.2 SAGA-LD's
final variance error is only 5-13% below SGLD's, and its fraction was 0.20, 0.10 and 0.40 with
--seed 0, 100 and 200. Larger batches leave SGLD little gradient noise to remove (B = 128, σ = 0.2:
SGLD's errors are within 0.01 of exact-gradient Langevin's).

(B) timing. One SAGA-LD step against one SGLD step for the MLP 784-512-512-10 (float32, CPU) at
batch B = 128 with N = 60,000 random examples and the ``policy="auto"`` table. A step is
zero_grad + forward + cross-entropy backward + ``sampler.step(indices=idx)``; batches are indexed
from in-memory tensors outside the timed region (no DataLoader). SGLD, SAGA-LD with the engine's
``check=False`` and SAGA-LD with the default ``check=True`` take turns step by step (rotating
which goes first) after ``--timing-warmup`` steps; printed: medians of ``--timing-repeats`` steps,
their ratios to SGLD (target ≤ 1.5×), and the share of a SAGA-LD step spent in engine.collect()
and in the table (sum_rows + update), from a second series of steps timed from inside.
``--threads`` defaults to 1: with 2 torch threads on this 2-core machine a step's parallel regions
stall for milliseconds whenever another process holds a core, and the ratios become noise.

Usage:
    python benchmarks/variance_reduction.py [--part {all,efficiency,timing}] [--passes 200] [--repeats 6]
        [--seed 0] [--prior-std 0.1 0.2 1.0] [--lr H [H ...] | --step-fraction 0.75] [--batch-size 32]
        [--checkpoint-every 5] [--burn-in 0.1] [--centre-tol 1e-4] [--ref-chains 8] [--ref-warmup 2000]
        [--ref-draws 25000] [--timing-repeats 30] [--timing-warmup 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import arviz as az
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_sample import SAGALD, SGLD, SGLDCV, SVRGLD, priors
from vr_mcmc.data import IndexedDataset, UniformIndexSampler
from vr_mcmc.models import mlp
from vr_mcmc.per_example import PerExampleGradients

METHODS = ("SGLD", "SAGA-LD", "SVRG-LD", "SGLD-CV")
TARGET_ACCEPTANCE = 0.574  # optimal for MALA (Roberts & Rosenthal 1998)


# ---------------------------------------------------------------------------------------------
# (A) the model and its reference posterior


def load_problem() -> tuple[np.ndarray, np.ndarray]:
    """Standardized breast-cancer features with a trailing column of ones (the intercept), and labels."""
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return np.hstack([x, np.ones((len(x), 1))]), y.astype(np.float64)


def log_density(theta: np.ndarray, z: np.ndarray, y: np.ndarray, prior_std: float) -> tuple[np.ndarray, np.ndarray]:
    """log π up to a constant and its gradient, for a batch of parameter vectors ``theta`` [K, d]."""
    logits = theta @ z.T  # [K, N]
    # log σ(t) = −softplus(−t): the stable form for the large |t| of confident predictions
    loglik = (y * logits - np.logaddexp(0.0, logits)).sum(1)
    prob = 0.5 * (1.0 + np.tanh(0.5 * logits))  # σ without overflow warnings
    grad = (y - prob) @ z - theta / prior_std**2
    return loglik - 0.5 * (theta**2).sum(1) / prior_std**2, grad


def find_map(z: np.ndarray, y: np.ndarray, prior_std: float) -> tuple[np.ndarray, np.ndarray]:
    """The posterior mode by Newton's method (U is strictly convex), and the Hessian of U there."""
    d = z.shape[1]
    theta = np.zeros(d)
    for _ in range(100):
        _, grad = log_density(theta[None], z, y, prior_std)
        prob = 0.5 * (1.0 + np.tanh(0.5 * (z @ theta)))
        hess = (z * (prob * (1 - prob))[:, None]).T @ z + np.eye(d) / prior_std**2
        delta = np.linalg.solve(hess, grad[0])
        theta = theta + delta
        if np.abs(delta).max() < 1e-12:
            break
    return theta, hess


@dataclass
class Reference:
    mean: np.ndarray
    sd: np.ndarray
    acceptance: float
    step: float
    ess: np.ndarray
    rhat: np.ndarray
    draws: int
    map: np.ndarray
    curvature: np.ndarray  # eigenvalues of the Hessian of U at the MAP, ascending
    seconds: float


def mala_reference(z: np.ndarray, y: np.ndarray, prior_std: float, chains: int, warmup: int, draws: int,
                   seed: int) -> Reference:
    """Preconditioned MALA, ``chains`` chains advanced together in whitened coordinates u = L⁻¹(θ − θ_MAP)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    mode, hess = find_map(z, y, prior_std)
    chol = np.linalg.cholesky(np.linalg.inv(hess))  # θ = θ_MAP + L·u has Laplace covariance L·Lᵀ
    d = len(mode)

    def target(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lp, grad = log_density(mode + u @ chol.T, z, y, prior_std)
        return lp, grad @ chol

    u = 1.5 * rng.standard_normal((chains, d))
    lp, grad = target(u)
    log_eps = math.log(1.0 / d ** (1 / 6))  # MALA's step scales as d^(-1/6) on a whitened target
    kept = np.empty((chains, draws, d))
    accepted = 0
    for t in range(warmup + draws):
        eps = math.exp(log_eps)
        mean_fwd = u + 0.5 * eps**2 * grad
        prop = mean_fwd + eps * rng.standard_normal(u.shape)
        lp_prop, grad_prop = target(prop)
        mean_bwd = prop + 0.5 * eps**2 * grad_prop
        log_q_fwd = -((prop - mean_fwd) ** 2).sum(1) / (2 * eps**2)
        log_q_bwd = -((u - mean_bwd) ** 2).sum(1) / (2 * eps**2)
        log_alpha = np.minimum(0.0, lp_prop - lp + log_q_bwd - log_q_fwd)
        accept = np.log(rng.random(chains)) < log_alpha
        u = np.where(accept[:, None], prop, u)
        lp = np.where(accept, lp_prop, lp)
        grad = np.where(accept[:, None], grad_prop, grad)
        if t < warmup:
            # decreasing gains: the step settles, and is frozen before the draws that are kept
            log_eps += (np.exp(log_alpha).mean() - TARGET_ACCEPTANCE) / (t + 1) ** 0.6
        else:
            kept[:, t - warmup] = mode + u @ chol.T
            accepted += int(accept.sum())
    data = az.convert_to_dataset(kept)
    ess = np.asarray(az.ess(data)["x"].values)
    rhat = np.asarray(az.rhat(data)["x"].values)
    flat = kept.reshape(-1, d)
    return Reference(flat.mean(0), flat.std(0), accepted / (chains * draws), math.exp(log_eps), ess, rhat,
                     chains * draws, mode, np.linalg.eigvalsh(hess), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# (A) the stochastic-gradient samplers


@dataclass
class Run:
    passes: np.ndarray  # [S] data passes used after each step
    draws: np.ndarray  # [S, d] the iterate after each step
    centre: np.ndarray | None = None  # SGLD-CV's centre
    centre_passes: float = 0.0  # what finding it cost


class LogisticRegression(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1, dtype=torch.float64)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    def flat(self) -> np.ndarray:
        # the order of the reference: the features' weights, then the intercept
        return torch.cat([self.linear.weight.detach().reshape(-1), self.linear.bias.detach()]).numpy().copy()


def run_sampler(method: str, dataset: TensorDataset, lr: float, batch_size: int, passes: float, seed: int,
                prior_std: float, centre_tol: float) -> Run:
    """One chain of ``method`` from θ = 0 until ``passes`` data passes are spent; the iterate after every step."""
    x, _ = dataset.tensors
    n = len(dataset)
    indexed = IndexedDataset(dataset)
    prior = priors.Normal(prior_std)
    model = LogisticRegression(x.shape[1] - 1)

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(xb[:, :-1]), yb)

    # The same batches and noise for every method of a repeat: differences come from the estimators.
    loader = DataLoader(indexed, batch_sampler=UniformIndexSampler(n, batch_size, seed=seed))
    full_loader = DataLoader(indexed, batch_size=n)
    generator = torch.Generator().manual_seed(seed)
    used = 0.0
    trace_passes: list[float] = []
    trace: list[np.ndarray] = []

    if method == "SGLD":
        sampler = SGLD(model.parameters(), lr, n, prior=prior, generator=generator)
    elif method == "SAGA-LD":
        sampler = SAGALD(model.parameters(), lr, n, PerExampleGradients(model, check=False), prior=prior,
                         generator=generator)
    elif method == "SVRG-LD":
        sampler = SVRGLD(model.parameters(), lr, n, len(loader), full_loader, loss_fn, prior=prior,
                         generator=generator)
    elif method == "SGLD-CV":
        # The centre by full-batch L-BFGS: the SAGA optimizer does not converge at the sampler's h here
        # (it needs a far smaller step), and plain GD is slow on this curvature spread.
        xs, ys = dataset.tensors
        optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=centre_tol,
                                      tolerance_change=0.0, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:  # U/N, so that centre_tol is in per-example units
            optimizer.zero_grad()
            loss = loss_fn(xs, ys) - sum(prior.log_prob(p) for p in model.parameters()) / n
            loss.backward()
            return loss

        optimizer.step(objective)
        used += optimizer.state[next(iter(model.parameters()))]["func_evals"]  # each one a full pass
        centre_cost = used
        centre = [p.detach().clone() for p in model.parameters()]
        centre_flat = model.flat()
        sampler = SGLDCV(model.parameters(), lr, n, full_loader, loss_fn, centre, prior=prior, generator=generator)
    else:
        raise ValueError(f"unknown method {method!r}")
    if method != "SGLD-CV":
        centre_flat, centre_cost = None, 0.0

    needs_closure = method in ("SVRG-LD", "SGLD-CV")
    while used < passes:
        for idx, xb, yb in loader:
            if needs_closure:
                def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                    sampler.zero_grad()
                    loss = loss_fn(xb, yb)
                    loss.backward()
                    return loss

                sampler.step(closure, indices=idx)
            else:
                sampler.zero_grad()
                loss_fn(xb, yb).backward()
                sampler.step(indices=idx)
            used += sampler.stats["grad_evals"] / n
            trace_passes.append(used)
            trace.append(model.flat())
            if used >= passes:
                break
    return Run(np.asarray(trace_passes), np.stack(trace), centre_flat, centre_cost)


def errors_at(run: Run, checkpoints: np.ndarray, burn_in: float, ref: Reference) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance errors (see the module docstring) at each checkpoint; NaN before any draw is kept."""
    mean_err = np.full(len(checkpoints), np.nan)
    var_err = np.full(len(checkpoints), np.nan)
    for k, p in enumerate(checkpoints):
        keep = (run.passes > burn_in * p) & (run.passes <= p + 1e-9)
        if keep.sum() < 2:
            continue
        sample = run.draws[keep]
        mean_err[k] = math.sqrt(np.mean(((sample.mean(0) - ref.mean) / ref.sd) ** 2))
        var_err[k] = math.sqrt(np.mean((sample.var(0) / ref.sd**2 - 1.0) ** 2))
    return mean_err, var_err


def passes_to_reach(curve: np.ndarray, checkpoints: np.ndarray, level: float) -> float:
    """First checkpoint from which ``curve`` stays ≤ ``level`` (NaN if it never does)."""
    below = np.nan_to_num(curve, nan=np.inf) <= level
    for k in range(len(checkpoints)):
        if below[k:].all():
            return float(checkpoints[k])
    return math.nan


def compare(z: np.ndarray, y: np.ndarray, prior_std: float, lr: float | None, args: argparse.Namespace) -> None:
    """Reference, the four samplers' error curves and the headline for one prior and step size
    (None: ``args.step_fraction`` / the largest curvature at the MAP)."""
    n = z.shape[0]
    ref = mala_reference(z, y, prior_std, args.ref_chains, args.ref_warmup, args.ref_draws, args.seed)
    lam = ref.curvature
    if lr is None:
        lr = float(f"{args.step_fraction / lam[-1]:.2g}")  # a round number to quote and to reuse with --lr
    print(f"\n=== prior N(0, {prior_std:g}²), h = {lr:g}, B = {args.batch_size}; Hessian of U at the MAP: eigenvalues "
          f"{lam[0]:.1f}..{lam[-1]:.1f}, h·λmax = {lr * lam[-1]:.2f}, slowest relaxation 1/(h·λmin) = "
          f"{1 / (lr * lam[0]) / math.ceil(n / args.batch_size):.1f} passes")
    print(f"reference: preconditioned MALA, {args.ref_chains} chains x ({args.ref_warmup} warm-up + "
          f"{args.ref_draws} draws), step {ref.step:.3f} (whitened), acceptance {ref.acceptance:.3f}, "
          f"{ref.seconds:.1f} s")
    print(f"  bulk ESS min {ref.ess.min():.0f} / median {np.median(ref.ess):.0f} of {ref.draws} draws; "
          f"R-hat max {ref.rhat.max():.4f}; MC error of the mean <= {1 / math.sqrt(ref.ess.min()):.4f} sd; "
          f"posterior sd {ref.sd.min():.3f}..{ref.sd.max():.3f}; |mean - MAP| max "
          f"{np.abs((ref.mean - ref.map) / ref.sd).max():.3f} sd")

    dataset = TensorDataset(torch.from_numpy(z), torch.from_numpy(y))
    checkpoints = np.arange(args.checkpoint_every, args.passes + 1e-9, args.checkpoint_every)
    curves: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {m: ([], []) for m in METHODS}
    seconds = dict.fromkeys(METHODS, 0.0)
    centre_err: list[float] = []
    centre_cost = 0.0
    exact: list[tuple[np.ndarray, np.ndarray]] = []
    for r in range(args.repeats):
        for method in METHODS:
            start = time.perf_counter()
            run = run_sampler(method, dataset, lr, args.batch_size, args.passes, args.seed + r, prior_std,
                              args.centre_tol)
            seconds[method] += time.perf_counter() - start
            mean_err, var_err = errors_at(run, checkpoints, args.burn_in, ref)
            curves[method][0].append(mean_err)
            curves[method][1].append(var_err)
            if run.centre is not None:
                centre_err.append(math.sqrt(np.mean(((run.centre - ref.map) / ref.sd) ** 2)))
                centre_cost = run.centre_passes
            if method == "SGLD":
                # Exact gradients (SGLD on the full batch, i.e. ULA) for as many steps as SGLD took: the
                # error left without any gradient noise, at this h. Each step is a pass, so it is not on
                # the passes axis.
                steps = len(run.passes)
                full = run_sampler("SGLD", dataset, lr, n, steps, args.seed + r, prior_std, args.centre_tol)
                exact.append(errors_at(full, np.array([float(steps)]), args.burn_in, ref))
    mean_curves = {m: np.mean(c[0], axis=0) for m, c in curves.items()}
    var_curves = {m: np.mean(c[1], axis=0) for m, c in curves.items()}

    def final(values: list[np.ndarray]) -> str:
        last = np.array([v[-1] for v in values])
        return f"{last.mean():.4f} ± {last.std(ddof=1) / math.sqrt(len(last)) if len(last) > 1 else math.nan:.4f}"

    print(f"samplers: {args.passes:g} passes, burn-in {args.burn_in:.0%} of the passes at each checkpoint, mean of "
          f"{args.repeats} repeats (seeds {args.seed}..{args.seed + args.repeats - 1}); SGLD-CV's passes include "
          f"{centre_cost:g} of full-batch L-BFGS for its centre (RMS distance to the exact MAP "
          f"{np.mean(centre_err):.4f} sd)")
    print("seconds per repeat: " + ", ".join(f"{m} {seconds[m] / args.repeats:.1f}" for m in METHODS))
    for title, table in (("mean error (RMS of (mean - ref)/sd)", mean_curves),
                         ("variance error (RMS of var/ref var - 1)", var_curves)):
        print(f"{title}")
        print(f"{'passes':>7}" + "".join(f"{m:>10}" for m in METHODS))
        for k, p in enumerate(checkpoints):
            print(f"{p:7.0f}" + "".join(f"{table[m][k]:10.4f}" for m in METHODS))

    print(f"final errors, mean ± standard error over the {args.repeats} repeats:")
    for m in METHODS:
        print(f"  {m:8} mean {final(curves[m][0])}   variance {final(curves[m][1])}")
    print(f"  exact-gradient Langevin (ULA, full batch) for SGLD's {steps} steps (= {steps} passes): mean "
          f"{final([e[0] for e in exact])}   variance {final([e[1] for e in exact])}")
    print("passes to reach SGLD's final error, as a fraction of SGLD's passes (target for SAGA-LD <= 1/3)")
    for title, table in (("mean", mean_curves), ("variance", var_curves)):
        level = table["SGLD"][-1]
        parts = []
        for m in METHODS[1:]:
            need = passes_to_reach(table[m], checkpoints, level)
            parts.append(f"{m} {need:g} ({need / args.passes:.3f})" if math.isfinite(need) else f"{m} never")
        print(f"  {title:8} error {level:.4f} (SGLD at {args.passes:g}): " + ", ".join(parts))
    for title, table in (("mean", mean_curves), ("variance", var_curves)):
        need = passes_to_reach(table["SAGA-LD"], checkpoints, table["SGLD"][-1])
        met = math.isfinite(need) and need <= args.passes / 3
        frac = f"{need / args.passes:.3f} of SGLD's passes" if math.isfinite(need) else "more than SGLD's passes"
        print(f"HEADLINE prior sd {prior_std:g}, h {lr:g}, {title} error: SAGA-LD needs {frac} -> target "
              f"{'met' if met else 'NOT met'}")


def efficiency(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float64)
    # Tensors of 32 x 31: a parallel region costs more than it saves, and stalls for milliseconds
    # when other processes hold the cores.
    torch.set_num_threads(1)
    if args.lr is not None and len(args.lr) != len(args.prior_std):
        raise SystemExit("--lr needs one step size per --prior-std")
    z, y = load_problem()
    print(f"(A) Bayesian logistic regression, breast cancer: N={z.shape[0]}, d={z.shape[1]}, float64, 1 thread")
    for prior_std, lr in zip(args.prior_std, args.lr or [None] * len(args.prior_std)):
        compare(z, y, prior_std, lr, args)


# ---------------------------------------------------------------------------------------------
# (B) step time


def timing(args: argparse.Namespace) -> None:
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(args.threads)
    n, batch = 60_000, 128
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, 784, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    torch.manual_seed(args.seed)
    init = mlp((784, 512, 512, 10)).state_dict()
    # A tiny step: the nets must not drift over the timed steps (only the speed is measured).
    lr, prior = 1e-7, priors.Normal(1.0)
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    engines: dict[str, PerExampleGradients] = {}
    for name in ("SGLD", "SAGA-LD", "SAGA-LD check"):
        model = mlp((784, 512, 512, 10))
        model.load_state_dict(init)
        if name == "SGLD":
            sampler: torch.optim.Optimizer = SGLD(model.parameters(), lr, n, prior=prior)
        else:
            # check=False is the engine's setting for a hot loop; the default (check=True) probes every
            # parameter's Σ_i g_i against its .grad each step.
            engines[name] = PerExampleGradients(model, check=name.endswith("check"))
            sampler = SAGALD(model.parameters(), lr, n, engines[name], prior=prior, policy="auto")
        runs[name] = (model, sampler)
    index_sampler = UniformIndexSampler(n, batch, seed=args.seed)
    batches = iter(index_sampler)

    def next_batch() -> torch.Tensor:
        nonlocal batches
        idx = next(batches, None)
        if idx is None:
            batches = iter(index_sampler)
            idx = next(batches)
        return torch.tensor(idx)

    def step(name: str, idx: torch.Tensor) -> float:
        model, sampler = runs[name]
        xb, yb = x[idx], y[idx]  # gathered outside the timed region: data loading is not the sampler's cost
        start = time.perf_counter()
        sampler.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        sampler.step(indices=idx)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for k in range(args.timing_warmup + args.timing_repeats):
        idx = next_batch()
        # rotate the order, so that none always runs first (or right after another's allocations)
        for name in names[k % len(names):] + names[: k % len(names)]:
            t = step(name, idx)
            if k >= args.timing_warmup:
                times[name].append(t)
    med = {name: statistics.median(t) for name, t in times.items()}

    # The split: a second series of SAGA-LD steps (check=False) with the engine and the table timed from inside.
    parts = {"collect": 0.0, "table": 0.0}
    engine, table = engines["SAGA-LD"], runs["SAGA-LD"][1].table

    def timed(part: str, fn: Callable) -> Callable:
        def wrapper(*a: object, **kw: object) -> object:
            start = time.perf_counter()
            out = fn(*a, **kw)
            parts[part] += time.perf_counter() - start
            return out
        return wrapper

    # instance attributes shadow the methods that the estimator calls
    engine.collect = timed("collect", engine.collect)
    table.sum_rows = timed("table", table.sum_rows)
    table.update = timed("table", table.update)
    split_total = sum(step("SAGA-LD", next_batch()) for _ in range(args.timing_repeats))
    layouts = ", ".join(f"{name} {kind}" for name, (kind, _) in table.plan().items())

    print(f"\n(B) step time, MLP 784-512-512-10 float32, B={batch}, N={n:,}, {torch.get_num_threads()} threads; "
          f"median of {args.timing_repeats} interleaved steps after {args.timing_warmup} warm-up")
    print(f"  SAGA-LD table (policy='auto'): {table.nbytes / 1e9:.2f} GB; {layouts}")
    for name in names:
        ratio = med[name] / med["SGLD"]
        met = "met" if ratio <= 1.5 else "NOT met"
        verdict = "" if name == "SGLD" else f"   ratio {ratio:.2f}x (target <= 1.5x: {met})"
        label = {"SGLD": "SGLD", "SAGA-LD": "SAGA-LD (engine check=False)",
                 "SAGA-LD check": "SAGA-LD (engine check=True)"}[name]
        print(f"  {label:30} {med[name] * 1e3:8.2f} ms{verdict}")
    rest = split_total - parts["collect"] - parts["table"]
    print(f"  SAGA-LD (check=False) split over {args.timing_repeats} more steps (mean "
          f"{split_total / args.timing_repeats * 1e3:.2f} ms): engine.collect {parts['collect'] / split_total:.0%}, "
          f"table sum_rows + update {parts['table'] / split_total:.0%}, rest (zero_grad, forward, backward, "
          f"estimate, update of θ) {rest / split_total:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "efficiency", "timing"), default="all")
    parser.add_argument("--passes", type=float, default=200, help="budget of data passes per sampler")
    parser.add_argument("--repeats", type=int, default=6, help="independent repeats (seeds) averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="step size h, the same for every sampler; one per --prior-std (default: --step-fraction)")
    parser.add_argument("--step-fraction", type=float, default=0.75,
                        help="without --lr: h = this / the largest eigenvalue of the Hessian of U at the MAP")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint-every", type=float, default=5, help="passes between error checkpoints")
    parser.add_argument("--burn-in", type=float, default=0.1, help="fraction of a checkpoint's passes discarded")
    parser.add_argument("--centre-tol", type=float, default=1e-4,
                        help="L-BFGS tolerance on the gradient of U/N for SGLD-CV's centre")
    parser.add_argument("--prior-std", type=float, nargs="+", default=[0.1, 0.2, 1.0],
                        help="std of the N(0, std²) prior; one comparison per value")
    parser.add_argument("--ref-chains", type=int, default=8)
    parser.add_argument("--ref-warmup", type=int, default=2000)
    parser.add_argument("--ref-draws", type=int, default=25000, help="kept MALA draws per chain")
    parser.add_argument("--timing-repeats", type=int, default=30)
    parser.add_argument("--timing-warmup", type=int, default=5)
    # 1 by default: with 2 threads on 2 shared cores, a parallel region stalls whenever another process holds a core
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the step timing")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    if args.part in ("all", "efficiency"):
        efficiency(args)
    if args.part in ("all", "timing"):
        timing(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
