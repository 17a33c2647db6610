"""The paths made cheaper for small models (issue 19), against independent references.

- A SAGA-LD chain (the packed table: one gather, sum and write of all parameters' rows a step; the vectorized
  noise variance; the torch.func fallback with its cached output dimensions, and from the engine's 9th batch its
  one-replay masked-cotangent path; batches of two sizes) equals a
  float64 loop over single-example backward passes with a hand-kept table, step by step: parameters and
  ``noise_ratio`` to 1e-10 relative (float64 rounding; the two sum in different orders).
- The spot-check schedule of the consistency check: a defect on every batch raises at the first step; one
  that starts later raises at the next scheduled check (step 64), not before; ``spot_check_every = 1``
  checks every step.
- The fallback still refuses a module that mixes examples after its output dimensions were cached.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torch_sample
from torch_sample import priors
from vr_mcmc.per_example import MixedExamplesError, PerExampleError, PerExampleGradients

F64 = torch.float64


class AR(nn.Module):
    """AR(3) with intercept and log σ: a bare parameter, so the whole module goes through the fallback."""

    def __init__(self):
        super().__init__()
        self.ar = nn.Linear(3, 1)
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, lags):
        return self.ar(lags).squeeze(-1), self.log_sigma.expand(lags.shape[0])


def nll(model, lags, y):
    """Per-example Gaussian NLL [B]."""
    mean, log_sigma = model(lags)
    return 0.5 * ((y - mean) * torch.exp(-log_sigma)) ** 2 + log_sigma


def ar_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def test_saga_ld_chain_equals_a_float64_per_example_loop():
    n, lr, temp, std = 12, 1e-3, 1.0, 0.7
    lags, y = ar_data(n)
    torch.manual_seed(3)
    model = AR().double()
    ref = [p.detach().clone() for p in model.parameters()]
    engine = PerExampleGradients(model)
    sampler = torch_sample.SAGALD(model.parameters(), lr=lr, num_data=n, engine=engine, temperature=temp,
                                  prior=priors.Normal(std), generator=torch.Generator().manual_seed(5))
    noise_gen = torch.Generator().manual_seed(5)  # the sampler's noise, drawn in the same order
    rows = [[torch.zeros_like(p) for p in ref] for _ in range(n)]  # the hand-kept table, float64
    order = torch.Generator().manual_seed(1)
    # batches of 4, and of 3 (a new shape for the fallback's cached output dimensions), past the spot checks
    sizes = [4] * 12 + [3] * 6
    assert sampler.estimator.table.packed is None  # allocated at the first step
    for step, b in enumerate(sizes):
        idx = torch.randperm(n, generator=order)[:b]
        # reference: per-example gradients by one backward per example at the reference θ
        probe = AR().double()
        with torch.no_grad():
            for q, r in zip(probe.parameters(), ref):
                q.copy_(r)
        g = []
        for i in idx.tolist():
            grads = torch.autograd.grad(nll(probe, lags[i:i + 1], y[i:i + 1]).sum(), list(probe.parameters()))
            g.append([t.detach() for t in grads])
        total = [sum(rows[j][k] for j in range(n)) for k in range(len(ref))]
        diffs = [[g[a][k] - rows[i][k] for k in range(len(ref))] for a, i in enumerate(idx.tolist())]
        v = [total[k] + (n / b) * sum(d[k] for d in diffs) for k in range(len(ref))]
        num = den = 0.0
        for k, r in enumerate(ref):
            sq = sum(float(d[k].square().sum()) for d in diffs)
            s2 = (sq - float(sum(d[k] for d in diffs).square().sum()) / b) / (b - 1)
            num += lr * lr * max(s2, 0.0) * (n * n / b) * (1 - b / n)
            den += 2 * lr * temp * r.numel()
        noise = [torch.randn(r.shape, generator=noise_gen, dtype=F64) for r in ref]
        ref = [r - lr * (vk + r / std**2) + math.sqrt(2 * lr * temp) * xi for r, vk, xi in zip(ref, v, noise)]
        for a, i in enumerate(idx.tolist()):
            rows[i] = g[a]
        # the sampler, driven as vr_mcmc.sample drives it
        sampler.zero_grad()
        loss = nll(model, lags[idx], y[idx]).mean()
        loss.backward()
        sampler.step(indices=idx, loss=loss)
        assert sampler.estimator.table.packed_rows() is not None  # the packed step, not the per-parameter one
        assert engine._verify_replays == (step < 8)  # then the fallback's one-replay path
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        assert sampler.stats["noise_ratio"] == pytest.approx(num / den, rel=1e-10), step


def mlp_problem(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), x, y


def run_until_error(model, x, y, steps, defect_from, every=None):
    """SAGA-LD steps whose loss gets a non-per-example term (a prior folded into the loss) from step
    ``defect_from`` (1-based) on; the step at which the sampler raises, or None."""
    n = len(x)
    sampler = torch_sample.SAGALD(model.parameters(), lr=1e-4, num_data=n, engine=PerExampleGradients(model))
    if every is not None:
        sampler.estimator.spot_check_every = every
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        idx = torch.randperm(n, generator=gen)[:16]
        sampler.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if step >= defect_from:
            loss = loss + 0.1 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        try:
            sampler.step(indices=idx, loss=loss)
        except PerExampleError:
            return step
    return None


def test_a_defect_on_every_batch_raises_at_the_first_step():
    model, x, y = mlp_problem()
    assert run_until_error(model, x, y, 3, defect_from=1) == 1


def test_a_defect_that_starts_later_raises_at_the_next_spot_check():
    model, x, y = mlp_problem()
    assert run_until_error(model, x, y, 70, defect_from=20) == 64  # checked: steps 1-8, then 64, 128, ...
    model, x, y = mlp_problem()
    assert run_until_error(model, x, y, 70, defect_from=20, every=1) == 20


def test_collect_check_argument_overrides_the_engine_setting():
    model, x, y = mlp_problem()
    with PerExampleGradients(model) as engine:
        loss = nn.functional.cross_entropy(model(x[:8]), y[:8]) + sum(p.square().sum() for p in model.parameters())
        loss.backward()
        engine.collect(check=False)  # skipped: no error
        with pytest.raises(PerExampleError, match="do not add up"):
            engine.collect()  # the engine's default (check=True)
    model, x, y = mlp_problem()
    with PerExampleGradients(model, check=False) as engine:
        loss = nn.functional.cross_entropy(model(x[:8]), y[:8]) + sum(p.square().sum() for p in model.parameters())
        loss.backward()
        engine.collect()
        with pytest.raises(PerExampleError, match="do not add up"):
            engine.collect(check=True)


class SometimesMixing(nn.Module):
    """A parameterized module without a rule that mixes the examples (subtracts the batch mean) when told to."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.mix = False

    def forward(self, x):
        h = x * self.scale
        return h - h.mean(0, keepdim=True) if self.mix else h


def test_the_fallback_refuses_mixing_after_its_output_dimensions_were_cached():
    torch.manual_seed(0)
    model = nn.Sequential(SometimesMixing(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    with PerExampleGradients(model) as engine:
        model(x).square().sum().backward()
        engine.collect()  # caches the output dimensions for this shape
        model[0].mix = True
        model.zero_grad()
        model(x).square().sum().backward()
        with pytest.raises(MixedExamplesError, match="mixes examples"):
            engine.collect()


@pytest.mark.parametrize("momentum,nesterov,temperature", [(0.0, False, 1.0), (0.7, False, 0.5), (0.9, True, 0.0)])
def test_langevin_update_equals_a_per_parameter_loop(momentum, nesterov, temperature):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), ()]
    params = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    bufs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    lr = 0.01
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    noise_gen = torch.Generator().manual_seed(9)
    scale = math.sqrt(2 * lr * temperature * (1 - momentum))
    for k in range(len(shapes)):  # the update written out, one parameter after the other
        xi = torch.randn(shapes[k], generator=noise_gen, dtype=F64) if temperature else 0.0
        if momentum:
            ref_b[k] = momentum * ref_b[k] + grads[k] - (scale / lr) * xi
            step = grads[k] + momentum * ref_b[k] if nesterov else ref_b[k]
            ref_p[k] = ref_p[k] - lr * step
        else:
            ref_p[k] = ref_p[k] - lr * grads[k] + scale * xi
    torch_sample.langevin_update(params, grads, bufs if momentum else [None] * 3, lr=lr, temperature=temperature,
                                 momentum=momentum, nesterov=nesterov, generator=torch.Generator().manual_seed(9))
    for p, r in zip(params, ref_p):
        torch.testing.assert_close(p, r, rtol=1e-13, atol=1e-15)
    if momentum:
        for b, r in zip(bufs, ref_b):
            torch.testing.assert_close(b, r, rtol=1e-13, atol=1e-15)
