"""MALA, HMC and NUTS against the posteriordb reference draws (issue 5, must-show 2; issues 22, 13.6, 18).

Four chains from over-dispersed starts (2× the posterior sd), each adapted in its own warmup (step
size and a diagonal or a dense mass matrix, both for each sampler; HMC with a 20% step-size jitter,
without which fixed-length trajectories gave antithetic chains with an R-hat of 1.02 on earnings),
then compared parameter by parameter, on the constrained scale the reference draws are given in,
with the rstan NUTS reference (10 chains × 1000 draws):

- mean: |ours − reference| < 4 Monte Carlo standard errors, the two MCSEs (ArviZ's `mcse`, which
  accounts for autocorrelation) combined in quadrature; a correct sampler fails this with
  probability ~6e-5 per parameter;
- sd: within 10% of the reference sd (the chains' lengths give an sd error of ≤ 3% at the ESS we
  see, so 10% is ≥ 3 sd of margin);
- R-hat (rank-normalized split, ArviZ) < 1.01.

The run lengths are the shortest that keep every check's margin (measured min ESS in the module's
comments); they are fixed with the seeds, so the test is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import refposteriors
import torch

import torch_sample

az = pytest.importorskip("arviz")

pytestmark = pytest.mark.skipif(not refposteriors.available(), reason=refposteriors.unavailable_reason() or "-")

CHAINS = 4
# run -> (sampler, warmup steps, draws per chain, options)
RUNS = {
    "HMC-diag": ("HMC", 500, 1000, dict(num_leapfrog=10, jitter=0.2)),
    "HMC-dense": ("HMC", 500, 1000, dict(num_leapfrog=10, jitter=0.2, dense_mass=True)),
    "MALA-diag": ("MALA", 1000, 4000, {}),
    "MALA-dense": ("MALA", 1000, 4000, dict(dense_mass=True)),
    # NUTS (issue 18), all pairs slow (17-230 s each): on 2026-12-05 all 14 passed, min bulk ESS 975-5823,
    # no post-warmup divergence except with the dense metric on eight_schools_noncentered (6 of 4,000 draws) and
    # garch11 (1); on 2026-12-06, with NUTS ending its warmup as Stan does (step_size_tuning="stan"), all 14 passed
    # again (20 min on the loaded machine).
    "NUTS-diag": ("NUTS", 500, 1000, {}),
    "NUTS-dense": ("NUTS", 500, 1000, dict(dense_mass=True)),
}


# MALA on the three linear regressions (coefficients correlated up to ~0.99): its warmup mixes
# slowly, so the dense metric needs a longer one, and its draws are more autocorrelated.
LONGER = {("MALA-dense", name): (4000, 8000) for name in ("sblri-blr", "sblrc-blr", "nes1992-nes")}
# MALA with a diagonal metric: its ESS per step falls as 1/κ, κ the condition number of the posterior's
# correlation matrix, which no diagonal metric changes (24 on sblrc-blr and earnings, 274 on nes;
# even the exact marginal variances as metric gave sblrc-blr an ESS of ~250 in 4 × 4,000 draws).
LONGER.update({("MALA-diag", "sblrc-blr"): (2000, 16000),
               ("MALA-diag", "earnings-logearn_interaction_z"): (2000, 12000),
               ("MALA-diag", "eight_schools-eight_schools_noncentered"): (1000, 6000)})


def sample_chains(post: refposteriors.RefPosterior, run: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draws [chains, draws, dim] on the unconstrained scale, and the acceptance rates [chains, draws]."""
    method, warmup, draws, options = RUNS[run]
    warmup, draws = LONGER.get((run, post.name), (warmup, draws))
    out = np.empty((CHAINS, draws, post.dim))
    accept = np.empty((CHAINS, draws))
    for chain in range(CHAINS):
        generator = torch.Generator().manual_seed(1000 * seed + chain)
        theta = post.initial_point(generator, scale=2.0).requires_grad_(True)
        sampler = getattr(torch_sample, method)([theta], lr=0.1, generator=generator, **options)
        closure = torch_sample.log_density_closure(post.log_density, theta)
        sampler.adapt(True, num_warmup=warmup)
        for _ in range(warmup):
            sampler.step(closure)
        sampler.adapt(False)
        for i in range(draws):
            sampler.step(closure)
            out[chain, i] = theta.detach().numpy()
            accept[chain, i] = sampler.stats["acceptance_rate"]
    return out, accept


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


def check(post: refposteriors.RefPosterior, draws: np.ndarray) -> list[str]:
    """The failed criteria, one line per parameter."""
    ours = post.to_params(torch.from_numpy(draws))
    reference = post.reference()
    failures = []
    for param in post.param_names:
        x, ref = ours[param].numpy(), reference[param]
        se = float(np.hypot(az.mcse(x), az.mcse(ref)))
        z = abs(x.mean() - ref.mean()) / se
        sd_ratio = x.std(ddof=1) / ref.std(ddof=1)
        rhat = float(az.rhat(x))
        if not (z < 4 and abs(sd_ratio - 1) < 0.1 and rhat < 1.01):
            failures.append(f"{param}: mean off by {z:.2f} MCSE, sd ratio {sd_ratio:.3f}, R-hat {rhat:.4f}, "
                            f"ESS {float(az.ess(x)):.0f}")
    return failures


# MALA-diag on nes1992-nes (correlation κ = 274) is measured to need ~160,000 draws per chain: 4 × 40,000
# after a 4,000-step warmup gave min ESS 266 and R-hat 1.017. Run at the default length, it must fail.
TOO_SLOW = {("MALA-diag", "nes1992-nes")}


# The default selection (`pytest` without -m) runs two of the 28 pairs, one per sampler and metric kind, on the
# hardest well-posed regressions: together ~50 s on the loaded 2-core CPU machine. All 28 took 12 min there (17–71 s
# each; the LONGER ones minutes), more than the whole suite's 10-minute budget: `pytest -m slow` runs the rest.
DEFAULT = {("HMC-diag", "nes1992-nes"), ("MALA-dense", "earnings-logearn_interaction_z")}


def _marks(run: str, name: str) -> list:
    marks = []
    if (run, name) in TOO_SLOW:
        marks.append(pytest.mark.xfail(strict=True, reason="MALA with a diagonal metric needs ~40× the draws on a "
                                       "posterior with correlation κ = 274"))
    if (run, name) not in DEFAULT:  # 17 s to minutes each on a 2-core CPU: run with `pytest -m slow`
        marks.append(pytest.mark.slow)
    return marks


@pytest.mark.parametrize("name, run", [
    pytest.param(name, run, marks=_marks(run, name)) for run in RUNS for name in refposteriors.POSTERIORS])
def test_matches_reference_draws(name: str, run: str):
    post = refposteriors.POSTERIORS[name]
    draws, accept = sample_chains(post, run)
    failures = check(post, draws)
    assert not failures, f"{run} on {name} (acceptance {accept.mean():.2f}):\n" + "\n".join(failures)
