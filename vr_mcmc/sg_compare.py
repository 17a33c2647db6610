"""Stochastic-gradient samplers on a digits BNN posterior, scored against its reference predictive.

What `vr-mcmc demo` and ``benchmarks/bnn_vr.py`` share: one chain of a method (SGLD, SAGA-LD,
SVRG-LD, SGLD-CV) on a `vr_mcmc.digits.DigitsBNN` posterior through `vr_mcmc.sample`, with a budget
counted in **data passes** (per-example gradients / N, everything included: SVRG's snapshot passes,
SGLD-CV's search for its centre and its μ̃ pass), the test predictive recorded a few times per pass,
and the predictive after a budget of b passes scored as a run of b passes would be: the class
probabilities averaged over the draws of the second half, (b/2, b] (the first half is burn-in).

Method settings: SGLD the plain minibatch estimate; SAGA-LD an exact table starting at zero;
SVRG-LD a snapshot every epoch (3 passes an epoch); SGLD-CV a centre found by SGD (T = 0, the same
step) for ``cv_centre_passes`` passes, then one full-gradient pass and 2 gradients per example a step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import torch_sample
from torch_sample import priors

from .digits import DigitsBNN
from .per_example import PerExampleGradients
from .predictive import PredictiveReference

__all__ = ["METHODS", "Run", "budget_predictives", "budget_scores", "run_method", "score_predictives"]

METHODS = ("SGLD", "SAGA-LD", "SVRG-LD", "SGLD-CV")
# gradient evaluations per example per step (× B) and extra full passes per epoch
_PASSES_PER_EPOCH = {"SGLD": 1.0, "SAGA-LD": 1.0, "SVRG-LD": 3.0, "SGLD-CV": 2.0}


def _loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class _PassCounter:
    """A sampler mix-in: ``stats["data_passes"]``, per-example gradients computed so far / N (from
    ``grad_evals``), starting at ``passes0`` (work done before sampling, e.g. SGLD-CV's centre)."""

    passes0 = 0.0

    def step(self, closure: Callable | None = None, **kwargs: Any) -> Any:
        out = super().step(closure, **kwargs)
        evals = self.stats.get("grad_evals", math.nan)
        self._evals = getattr(self, "_evals", 0.0) + (0.0 if math.isnan(evals) else evals)
        self.stats["data_passes"] = self.passes0 + self._evals / self.num_data
        return out


def _counting(cls: type) -> type:
    return type(cls.__name__, (_PassCounter, cls), {})


_SAMPLERS = {name: _counting(cls) for name, cls in (("SGLD", torch_sample.SGLD), ("SAGA-LD", torch_sample.SAGALD),
                                                    ("SVRG-LD", torch_sample.SVRGLD),
                                                    ("SGLD-CV", torch_sample.SGLDCV))}


def _sgd_centre(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prior: priors.Prior, lr: float, batch_size: int,
                passes: float, seed: int) -> None:
    """SGD (SGLD at T = 0) on the posterior's U for ``passes`` data passes, in place: SGLD-CV's centre."""
    n = len(x)
    opt = torch_sample.SGLD(model.parameters(), lr=lr, num_data=n, prior=prior, temperature=0.0)
    gen = torch.Generator().manual_seed(10_000 + seed)
    steps = max(1, round(passes * n / batch_size))
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step(indices=idx)


@dataclass
class Run:
    """One chain: draws' predictive ``probs`` [draws, points, classes], their ``passes``, mean ``noise_ratio``
    over the second half (NaN without diagnostics), wall ``seconds`` and their cumulative ``draw_seconds``."""

    method: str
    lr: float
    seed: int
    probs: np.ndarray
    passes: np.ndarray
    draw_seconds: np.ndarray
    noise_ratio: float
    seconds: float
    idata: Any = None


def run_method(problem: DigitsBNN, method: str, lr: float, batch_size: int, passes: float, *, seed: int = 0,
               num_chains: int = 1, draws_per_pass: float = 4.0, diagnostics: bool = False,
               cv_centre_passes: float = 5.0, data: Sequence[torch.Tensor] | None = None, progress: bool = False,
               keep_idata: bool = False) -> list[Run]:
    """Chains of ``method`` for a budget of ``passes`` data passes; one `Run` per chain (chain c has seed
    ``seed + c``, as in `vr_mcmc.sample`). ``diagnostics=True`` attaches the per-example engine (without
    its consistency check) and measures ``noise_ratio`` every step; it costs time, so timed runs leave it
    off. ``keep_idata=True`` also records each draw's test accuracy and log-likelihood and the pointwise
    test log-likelihood, and keeps the ArviZ data in each `Run`."""
    import vr_mcmc

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    data = problem.data() if data is None else data
    x, y, xt, _ = data
    n = len(x)
    prior = priors.Normal(problem.prior_std)
    temp = problem.temperature
    epoch_steps = math.ceil(n / batch_size)
    pre = cv_centre_passes + 1.0 if method == "SGLD-CV" else 0.0
    # one epoch more than the budget needs: the passes per step are estimated (a short last batch, SVRG's
    # snapshot at step 0), and the budget must be reached; draws past it are not scored
    steps = max(2, math.ceil((passes - pre) / _PASSES_PER_EPOCH[method] * epoch_steps) + epoch_steps)
    thin = max(1, round(epoch_steps / _PASSES_PER_EPOCH[method] / draws_per_pass))
    cls = _SAMPLERS[method]
    chunks = [(torch.arange(s, min(s + 512, n)), x[s:s + 512], y[s:s + 512]) for s in range(0, n, 512)]

    def sampler_fn(model: nn.Module):
        sampler = build(model)
        sampler.noise_ratio_every = 1 if diagnostics else 0
        return sampler

    def build(model: nn.Module):
        engine = PerExampleGradients(model, check=False) if (diagnostics or method == "SAGA-LD") else None
        common = dict(prior=prior, temperature=temp, engine=engine)
        if method in ("SGLD", "SAGA-LD"):
            return cls(model.parameters(), lr, n, **common)

        def full_loss(xb, yb):
            return F.cross_entropy(model(xb), yb)

        if method == "SVRG-LD":
            return cls(model.parameters(), lr, n, snapshot_every=epoch_steps, loader=chunks, loss_fn=full_loss,
                       **common)
        _sgd_centre(model, x, y, prior, lr, batch_size, cv_centre_passes, seed=int(torch.initial_seed()))
        sampler = cls(model.parameters(), lr, n, loader=chunks, loss_fn=full_loss, **common)
        sampler.passes0 = cv_centre_passes
        return sampler

    record = {"probs": lambda m: torch.softmax(m(xt), -1)}
    extra = {}
    if keep_idata:  # what a user inspects: each draw's test accuracy and log-likelihood, the pointwise one
        yt = data[3]
        rows = torch.arange(len(yt))
        record["accuracy"] = lambda m: (m(xt).argmax(-1) == yt).double().mean()
        record["test_loglik"] = lambda m: torch.log_softmax(m(xt), -1)[rows, yt].double().mean()
        extra = dict(log_likelihood=lambda m: torch.log_softmax(m(xt), -1)[rows, yt],
                     observed_data={"obs": yt.cpu().numpy()})
    started = [time.perf_counter()]
    times: list[float] = []

    def clock(m: nn.Module) -> torch.Tensor:  # seconds since the chain started, at each draw
        times.append(time.perf_counter() - started[0])
        return torch.tensor(times[-1], dtype=torch.float64)

    record["seconds"] = clock

    def model_fn() -> nn.Module:
        started[0] = time.perf_counter()
        return problem.model(x.device)

    idata = vr_mcmc.sample(model_fn, sampler_fn, _loss, (x, y), batch_size=batch_size, num_warmup=0,
                           num_samples=thin * -(-steps // thin), thin=thin, num_chains=num_chains, record=record,
                           seed=seed, progress=progress, **extra)
    post, stats = idata.posterior, idata.sample_stats
    runs = []
    for c in range(num_chains):
        passes_c = stats["data_passes"].values[c]
        half = passes_c > passes_c[-1] / 2
        ratio = stats["noise_ratio"].values[c][half]
        ratio = float(np.nanmean(ratio)) if np.isfinite(ratio).any() else math.nan
        secs = post["seconds"].values[c].astype(np.float64)
        runs.append(Run(method, lr, seed + c, post["probs"].values[c].astype(np.float32), passes_c, secs, ratio,
                        float(secs[-1]), idata if keep_idata else None))
    return runs


def budget_predictives(run: Run, budgets: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The run's predictive after each budget b, as a run of b passes gives it: the mean of the draws with
    b/2 < passes ≤ b ([budgets, points, classes], NaN past the run's end or where the window holds no draw),
    and the wall seconds at the last of those draws ([budgets])."""
    csum = np.concatenate([np.zeros((1, *run.probs.shape[1:])), np.cumsum(run.probs, axis=0, dtype=np.float64)])
    means = np.full((len(budgets), *run.probs.shape[1:]), np.nan)
    seconds = np.full(len(budgets), np.nan)
    for k, b in enumerate(budgets):
        if b > run.passes[-1] + 1e-6:
            continue
        lo = np.searchsorted(run.passes, b / 2, side="right")
        hi = np.searchsorted(run.passes, b + 1e-6, side="right")
        if hi > lo:
            means[k] = (csum[hi] - csum[lo]) / (hi - lo)
            seconds[k] = run.draw_seconds[hi - 1]
    return means, seconds


def score_predictives(means: np.ndarray, reference: PredictiveReference) -> dict[str, np.ndarray]:
    """TV, agreement, test log-likelihood and accuracy of predictives [..., points, classes] (NaN where a
    predictive is NaN, e.g. a budget a run did not reach)."""
    missing = np.isnan(means).any(axis=(-1, -2))
    scores = reference.scores(np.where(np.isnan(means), 1.0 / means.shape[-1], means))
    return {k: np.where(missing, np.nan, v) for k, v in scores.items()}


def budget_scores(run: Run, reference: PredictiveReference, budgets: Sequence[float]) -> dict[str, np.ndarray]:
    """TV, agreement, test log-likelihood, accuracy and wall seconds of the run after each budget
    (`budget_predictives`), each ``[budgets]``."""
    means, seconds = budget_predictives(run, budgets)
    return {**score_predictives(means, reference), "seconds": seconds}
