"""Per-step overhead of the variance-reduced SG samplers on small models (issue 19, "Must show" 3).

    PYTHONPATH=. python benchmarks/step_overhead.py                  # both models, all methods
    PYTHONPATH=/path/to/old/checkout python benchmarks/step_overhead.py   # the same on older code

Two small posteriors, one torch thread:

- **AR(5)**: y_t = c + Σ_{k=1..5} a_k·y_{t−k} + σ·ε_t on a synthetic series (N = 1,000 windows of 5 lags),
  batch 15. An ``nn.Module`` with 7 parameters: ``ar.weight`` [1, 5] (a_1..a_5, an ``nn.Linear(5, 1)``),
  ``ar.bias`` [1] (the intercept c) and ``log_sigma`` [] (log σ, a bare ``nn.Parameter``); its forward returns
  (mean, log σ per example) and the loss is the batch mean of the per-example Gaussian NLL
  ½((y − mean)/σ)² + log σ + ½ log 2π. Prior N(0, 1) on each parameter. The module has a parameter of its own
  and no per-example rule, so the engine differentiates it through the torch.func fallback.
- **demo MLP**: `vr_mcmc.digits.DigitsBNN()` (64-32-10 tanh, 2,410 parameters, digits N = 1,347), batch 64,
  its N(0, 0.5²) prior.

Each method steps the way `vr_mcmc.sample` drives it (`vr_mcmc.chains.runner`): draw the batch's indices,
index the data, then for SGLD and SAGA-LD ``loss = closure(); sampler.step(indices=idx, loss=loss)``, for
SVRG-LD and SGLD-CV ``sampler.step(closure, indices=idx)`` (the closure zeroes, computes the loss, backward).
A step's time is all of that. Methods:

- ``SGLD``: no engine (the default).
- ``SAGA-LD``: ``engine=PerExampleGradients(model)`` with its defaults (consistency check on) and the sampler's
  default ``noise_ratio`` every step: what a user gets.
- ``SAGA-LD lean``: ``PerExampleGradients(model, check=False)``, ``noise_ratio_every = 0``: the configuration
  the demo and ``benchmarks/bnn_vr.py`` time.
- ``SVRG-LD``: snapshot every epoch (⌈N/B⌉ steps), full pass in chunks of 512, no engine. Two forward/backward
  passes a step (at θ and θ̃) plus a full pass an epoch, so ≥ 2× SGLD by construction.
- ``SGLD-CV``: the centre = the parameters at the first step, no engine; two passes a step.

Timing: after ``--warmup`` steps of each, ``--rounds`` rounds in which every method makes ``--steps`` steps
in turn (order rotated each round); every step is timed; the median per method; ratios to SGLD's median
in the same run. Short blocks, so that bursts of load from other processes on a shared machine fall on all
methods alike; also printed, the 20th percentile ("p20"), which such bursts (they only add time) move least.
Temperature 1, small step sizes (the chains stay near their start: timing only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import torch_sample
from torch_sample import priors
from vr_mcmc.per_example import PerExampleGradients

METHODS = ("SGLD", "SAGA-LD", "SAGA-LD lean", "SVRG-LD", "SGLD-CV")


class AR(nn.Module):
    """AR(``order``) with intercept and log σ: ``order`` + 2 parameters."""

    def __init__(self, order: int = 5):
        super().__init__()
        self.ar = nn.Linear(order, 1)
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, lags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ar(lags).squeeze(-1), self.log_sigma.expand(lags.shape[0])


def ar_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    lags, y = batch
    mean, log_sigma = model(lags)
    nll = 0.5 * ((y - mean) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)
    return nll.mean()


def ar_problem(num_data: int = 1000, order: int = 5, seed: int = 0):
    """(model_fn, loss_fn, (lags [N, order], y [N]), prior): a simulated stationary AR(order) series."""
    gen = torch.Generator().manual_seed(seed)
    coef = torch.tensor([0.5, -0.2, 0.1, 0.05, -0.05])[:order]
    series = torch.zeros(num_data + order + 100)
    noise = 0.3 * torch.randn(series.numel(), generator=gen)
    for t in range(order, series.numel()):
        series[t] = 0.2 + (coef * series[t - order:t].flip(0)).sum() + noise[t]
    series = series[100:]
    lags = torch.stack([series[t - order:t].flip(0) for t in range(order, order + num_data)])
    y = series[order:order + num_data].clone()

    def model_fn():
        torch.manual_seed(1)
        return AR(order)

    return model_fn, ar_loss, (lags, y), priors.Normal(1.0)


def mlp_problem():
    from vr_mcmc.digits import DigitsBNN

    problem = DigitsBNN()
    x, y, _, _ = problem.data()

    def model_fn():
        torch.manual_seed(1)
        return problem.model()

    def loss_fn(model, batch):
        xb, yb = batch
        return F.cross_entropy(model(xb), yb)

    return model_fn, loss_fn, (x, y), priors.Normal(problem.prior_std)


class Chain:
    """One method's model, sampler and index stream, stepped as `vr_mcmc.sample`'s runner steps it."""

    def __init__(self, method: str, model_fn, loss_fn, data, prior, batch_size: int, lr: float):
        self.model = model = model_fn()
        self.loss_fn, self.data, self.batch_size = loss_fn, data, batch_size
        n = len(data[0])
        self.num_data = n
        self.gen = torch.Generator().manual_seed(0)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0
        common = dict(prior=prior, temperature=1.0, generator=torch.Generator().manual_seed(2))
        chunks = [(torch.arange(s, min(s + 512, n)), *(t[s:s + 512] for t in data)) for s in range(0, n, 512)]

        def full_loss(*batch):
            return loss_fn(model, batch)

        if method == "SGLD":
            self.sampler = torch_sample.SGLD(model.parameters(), lr, n, **common)
        elif method.startswith("SAGA-LD"):
            lean = method.endswith("lean")
            self.sampler = torch_sample.SAGALD(model.parameters(), lr, n,
                                               engine=PerExampleGradients(model, check=not lean), **common)
            if lean:
                self.sampler.noise_ratio_every = 0
        elif method == "SVRG-LD":
            self.sampler = torch_sample.SVRGLD(model.parameters(), lr, n, snapshot_every=math.ceil(n / batch_size),
                                               loader=chunks, loss_fn=full_loss, **common)
        elif method == "SGLD-CV":
            self.sampler = torch_sample.SGLDCV(model.parameters(), lr, n, loader=chunks, loss_fn=full_loss, **common)
        else:
            raise ValueError(method)
        self.needs_closure = getattr(self.sampler.estimator, "needs_closure", False)

    def next_indices(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.num_data:
            self.order, self.pos = torch.randperm(self.num_data, generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def step(self) -> None:
        idx = self.next_indices()
        batch = tuple(t[idx] for t in self.data)
        sampler, model, loss_fn = self.sampler, self.model, self.loss_fn

        def closure():
            sampler.zero_grad()
            out = loss_fn(model, batch)
            out.backward()
            return out

        if self.needs_closure:
            sampler.step(closure, indices=idx)
        else:
            loss = closure()
            sampler.step(indices=idx, loss=loss)


def measure(name: str, problem, batch_size: int, lr: float, methods, rounds: int, steps: int, warmup: int):
    model_fn, loss_fn, data, prior = problem
    chains = {m: Chain(m, model_fn, loss_fn, data, prior, batch_size, lr) for m in methods}
    for chain in chains.values():
        for _ in range(warmup):
            chain.step()
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for r in range(rounds):
        for m in order[r % len(order):] + order[:r % len(order)]:
            chain = chains[m]
            for _ in range(steps):
                t0 = time.perf_counter()
                chain.step()
                times[m].append(time.perf_counter() - t0)
    for m, chain in chains.items():
        if chain.sampler.stats.get("diverging"):
            raise RuntimeError(f"{name} {m} diverged: lower the step size")
    params = sum(p.numel() for p in chains[methods[0]].model.parameters())
    return params, {m: (statistics.median(ts), statistics.quantiles(ts, n=5)[0]) for m, ts in times.items()}


def count(problem, batch_size: int, lr: float, methods, steps: int = 10, warmup: int = 70) -> dict[str, tuple]:
    """Per method, (ATen operations, Python function calls) per step: deterministic measures of the per-step
    overhead, which do not move with the machine's load (ops inside torch.func's vmap are not all seen)."""
    import cProfile
    import pstats

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.calls += 1
            return func(*args, **(kwargs or {}))

    model_fn, loss_fn, data, prior = problem
    out = {}
    for m in methods:
        chain = Chain(m, model_fn, loss_fn, data, prior, batch_size, lr)
        for _ in range(warmup):  # past the spot checks of the first 8 steps
            chain.step()
        Ops.calls = 0
        with Ops():
            for _ in range(steps):
                chain.step()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(steps):
            chain.step()
        profile.disable()
        out[m] = (Ops.calls / steps, pstats.Stats(profile).total_calls / steps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ar", "mlp"], choices=["ar", "mlp"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--json", help="also write the medians here")
    p.add_argument("--count", action="store_true", help="count ATen ops and Python calls per step instead of timing")
    args = p.parse_args(argv)
    if "SGLD" not in args.methods:
        args.methods.insert(0, "SGLD")
    torch.set_num_threads(1)
    import vr_mcmc

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"torch {torch.__version__}, vr_mcmc from {os.path.dirname(vr_mcmc.__file__)}, {platform.machine()}, "
          f"1 thread, load {load:.2f}; " + ("operations counted over 10 steps after 70" if args.count else
                                             f"{args.rounds} rounds × {args.steps} interleaved steps per method"))
    out = {}
    specs = {"ar": ("AR(5)", ar_problem, 15, 1e-5), "mlp": ("demo MLP", mlp_problem, 64, 1e-5)}
    if args.count:
        print(f"{'model':<10}{'B':>5}  {'method':<14}{'ATen ops/step':>14}{'Python calls/step':>19}")
        for key in args.models:
            label, make, batch_size, lr = specs[key]
            for m, (ops, calls) in count(make(), batch_size, lr, args.methods).items():
                print(f"{label:<10}{batch_size:>5}  {m:<14}{ops:>14.1f}{calls:>19.1f}")
        return 0
    print(f"{'model':<10}{'P':>6}{'B':>5}  {'method':<14}{'ms/step':>9}{'/ SGLD':>9}{'p20 ms':>9}{'/ SGLD':>9}")
    for key in args.models:
        label, make, batch_size, lr = specs[key]
        params, stats = measure(label, make(), batch_size, lr, args.methods, args.rounds, args.steps, args.warmup)
        out[key] = {m: {"median_ms": t * 1e3, "p20_ms": q * 1e3} for m, (t, q) in stats.items()}
        base, base_q = stats["SGLD"]
        for m, (t, q) in stats.items():
            print(f"{label:<10}{params:>6}{batch_size:>5}  {m:<14}{t * 1e3:>9.3f}{t / base:>9.2f}{q * 1e3:>9.3f}"
                  f"{q / base_q:>9.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
