"""Where SAGA-LD is stable: Bayesian linear regression against its exact Gaussian posterior (issue #12).

Question (issue #12): on a 5,000-example linear regression (B = 100, at a step where SGLD's sds are
1.6-4.3x too wide after 60 passes) SAGA-LD became unstable while SVRG-LD and SGLD-CV did not. The
method (stale table rows at a large step) or our code?

Model: y_i = x̃_iᵀθ + ε_i, ε_i ~ N(0, σ²) with σ known, x̃_i = (x_i, 1) (nn.Linear with a bias),
prior θ ~ N(0, s0² I). U(θ) = |θ|²/(2 s0²) + Σ_i (x̃_iᵀθ − y_i)²/(2σ²): the posterior is exactly
N(m, H⁻¹), H = X̃ᵀX̃/σ² + I/s0², m = H⁻¹X̃ᵀy/σ². Two curvature scales set the step:

- u_E = h·λ_max(H): the Euler limit. A full-gradient Langevin step is stable for u_E < 2.
- u_S = h·(N/B)·L_max, L_max = max_i ‖∇²ℓ_i‖ = max_i ‖x̃_i‖²/σ²: the size of the kick that one
  example's correction (N/B)·∇²ℓ_i·(θ − θ_i) gives (θ_i: where example i was last visited for
  SAGA-LD, the snapshot for SVRG-LD). Its ratio to u_E is N·L_max/(B·λ_max(H)), about
  max_i ‖x̃_i‖² / (B · λ_max(Cov x̃)): small for a few evenly spread Gaussian features and a batch of
  100 (0.13 here), above 1 for heavy-tailed features (high-leverage rows), many features, or small
  batches.

Part 1 (code or method?): our `torch_sample.SAGALD` (nn.Linear in float64, engine attached, mean
Gaussian NLL, table ``policy="auto"``, rows starting at zero) against an independent NumPy float64
SAGA-LD (explicit per-example gradients x̃_i(x̃_iᵀθ − y_i)/σ²), fed the same batches and the same
Gaussian noise (drawn from the torch generator in the sampler's order): the largest difference of the
trajectories over 60 epochs, at the issue's step and at a step beyond the SAGA bound.

Part 2 (the stable range): NumPy float64 SGLD, SAGA-LD, SVRG-LD (snapshot every epoch) and SGLD-CV
(centre: the exact mode), 4 chains each from independent exact-posterior draws, 60 epochs of steps
(60 passes for SGLD and SAGA-LD; SVRG-LD pays 3 passes an epoch), batches from a fresh permutation
each epoch. Reported: the worst sd ratio max_j ŝ_j/s_j over the last half of the run (pooled chains;
"div" = non-finite or |θ| > 1e8), and for SAGA-LD the split R-hat and the sd ratio of the first half
of the kept draws (growing with passes = unstable). Settings (N, B, d, features):

- A: 5000, 100, 5, Gaussian with sds spread 0.5-1.4 (the issue's regime: u_S/u_E ≈ 0.13);
- B: 5000, 100, 5, Student-t(3) features with the same spread (high-leverage rows: u_S/u_E ≈ 2.4);
- C: 5000, 10, 5, Gaussian (small batch: u_S/u_E ≈ 1.5);
- D: 2000, 10, 50, Gaussian (many features: u_S/u_E ≈ 3.9);
- E: 1000, 10, 5, Student-t(3) (small N and batch, high leverage: u_S/u_E ≈ 8.2).

Run: ``OMP_NUM_THREADS=1 python benchmarks/saga_stability.py`` (about 1 min on one core;
``--quick`` fewer steps).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("sgld", "saga", "svrg", "cv")


@dataclass
class Problem:
    X: np.ndarray  # [N, d] features (the bias column is added as x̃ = (x, 1))
    y: np.ndarray
    sigma: float
    prior_std: float

    def __post_init__(self):
        self.N, self.d = self.X.shape
        self.Xt = np.hstack([self.X, np.ones((self.N, 1))])
        self.H = self.Xt.T @ self.Xt / self.sigma**2 + np.eye(self.d + 1) / self.prior_std**2
        self.cov = np.linalg.inv(self.H)
        self.mean = self.cov @ (self.Xt.T @ self.y) / self.sigma**2
        self.sd = np.sqrt(np.diag(self.cov))
        self.lam_max = float(np.linalg.eigvalsh(self.H)[-1])
        self.L_max = float((self.Xt**2).sum(1).max() / self.sigma**2)

    def units(self, h: float, B: int) -> tuple[float, float]:
        """(u_E, u_S) = (h·λ_max(H), h·(N/B)·L_max)."""
        return h * self.lam_max, h * self.N / B * self.L_max


def make_problem(N: int, d: int, features: str = "gauss", seed: int = 0, sigma: float = 1.0,
                 prior_std: float = 10.0) -> Problem:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.5, 1.4, d)
    raw = rng.standard_t(3, (N, d)) if features == "t3" else rng.standard_normal((N, d))
    X = raw * scales
    theta = rng.standard_normal(d + 1)
    y = np.hstack([X, np.ones((N, 1))]) @ theta + sigma * rng.standard_normal(N)
    return Problem(X, y, sigma, prior_std)


# -- the independent reference: one SAGA-LD chain, given batches and noise ---------------------------

def saga_ld_reference(prob: Problem, h: float, batches, noise: np.ndarray, theta0: np.ndarray) -> np.ndarray:
    """NumPy float64 SAGA-LD, DESIGN.md §2: v = Σ_j h_j + (N/B)Σ_{i∈S}(g_i − h_i), h_i ← g_i (rows start
    at 0), θ ← θ − h·(v + θ/s0²) + √(2h)·ξ. Returns the iterates [steps, d+1] (weights, then bias)."""
    N, p = prob.N, prob.d + 1
    rows, total, th = np.zeros((N, p)), np.zeros(p), theta0.astype(np.float64).copy()
    out = np.empty((len(batches), p))
    for t, idx in enumerate(batches):
        xb = prob.Xt[idx]
        g = xb * ((xb @ th - prob.y[idx]) / prob.sigma**2)[:, None]
        delta = g.sum(0) - rows[idx].sum(0)
        v = total + N / len(idx) * delta
        total += delta
        rows[idx] = g
        th = th - h * (v + th / prob.prior_std**2) + math.sqrt(2 * h) * noise[t]
        out[t] = th
    return out


def torch_noise(seed: int, d: int, steps: int) -> np.ndarray:
    """The noise our sampler draws from ``torch.Generator().manual_seed(seed)`` for nn.Linear(d, 1):
    each step ξ for the weight [1, d], then for the bias [1]."""
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((steps, d + 1))
    for t in range(steps):
        w = torch.randn((1, d), generator=gen, dtype=torch.float64)
        b = torch.randn((1,), generator=gen, dtype=torch.float64)
        out[t] = torch.cat([w.flatten(), b]).numpy()
    return out


def saga_ld_ours(prob: Problem, h: float, batches, seed: int, theta0: np.ndarray, policy: str = "auto") -> np.ndarray:
    """Our torch_sample.SAGALD on the same problem, batches and (generator-seeded) noise."""
    from torch import nn

    import torch_sample
    from torch_sample import priors
    from vr_mcmc.per_example import PerExampleGradients

    model = nn.Linear(prob.d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(theta0[:-1]).reshape(1, -1))
        model.bias.fill_(float(theta0[-1]))
    sampler = torch_sample.SAGALD(model.parameters(), lr=h, num_data=prob.N, engine=PerExampleGradients(model),
                                  prior=priors.Normal(prob.prior_std), policy=policy,
                                  generator=torch.Generator().manual_seed(seed))
    X, y = torch.as_tensor(prob.X), torch.as_tensor(prob.y)
    out = np.empty((len(batches), prob.d + 1))
    for t, idx in enumerate(batches):
        idx = torch.as_tensor(idx)
        sampler.zero_grad()
        loss = 0.5 * ((model(X[idx]).squeeze(-1) - y[idx]) ** 2).mean() / prob.sigma**2
        loss.backward()
        sampler.step(indices=idx)
        out[t] = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).numpy()
    return out


def epoch_batches(N: int, B: int, epochs: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [perm[s:s + B] for perm in (rng.permutation(N) for _ in range(epochs)) for s in range(0, N - B + 1, B)]


# -- the sweep: four samplers, chains vectorized ----------------------------------------------------

def run_chains(method: str, prob: Problem, h: float, B: int, epochs: int, chains: int = 4, seed: int = 0):
    """Iterates [chains, steps, d+1] of ``method`` (NumPy float64), or None if it diverged."""
    rng = np.random.default_rng(seed)
    N, p, Xt, y, s2 = prob.N, prob.d + 1, prob.Xt, prob.y, prob.sigma**2
    spe = N // B
    th = prob.mean + rng.standard_normal((chains, p)) @ np.linalg.cholesky(prob.cov).T  # exact draws
    rows, total = np.zeros((chains, N, p)), np.zeros((chains, p))
    full_at_mode = Xt.T @ (Xt @ prob.mean - y) / s2
    cc = np.arange(chains)[:, None]
    out = np.empty((chains, epochs * spe, p))
    for t in range(epochs * spe):
        k = t % spe
        if k == 0:
            perm = np.stack([rng.permutation(N) for _ in range(chains)])
            if method == "svrg":
                snap = th.copy()
                mu = ((snap @ Xt.T - y) @ Xt) / s2
        idx = perm[:, k * B:(k + 1) * B]
        xb = Xt[idx]                                           # [C, B, p]
        if method in ("sgld", "saga"):
            g = xb * ((np.einsum("cbp,cp->cb", xb, th) - y[idx]) / s2)[..., None]
            gs = g.sum(1)
            if method == "sgld":
                v = N / B * gs
            else:
                delta = gs - rows[cc, idx].sum(1)
                v = total + N / B * delta
                total += delta
                rows[cc, idx] = g
        else:
            centre, mu_c = (snap, mu) if method == "svrg" else (prob.mean[None], full_at_mode)
            v = mu_c + N / B * np.einsum("cbp,cb->cp", xb, np.einsum("cbp,cp->cb", xb, th - centre)) / s2
        th = th - h * (v + th / prob.prior_std**2) + math.sqrt(2 * h) * rng.standard_normal((chains, p))
        out[:, t] = th
        if k == 0 and not (np.isfinite(th).all() and np.abs(th).max() < 1e8):
            return None
    return out if np.isfinite(out).all() and np.abs(out).max() < 1e8 else None


def split_rhat(draws: np.ndarray) -> float:
    """Largest split R-hat over coordinates (Gelman et al. BDA3), draws [chains, n, p]."""
    n = draws.shape[1] // 2
    x = np.concatenate([draws[:, :n], draws[:, n:2 * n]], axis=0)
    w = x.var(1, ddof=1).mean(0)
    b = n * x.mean(1).var(0, ddof=1)
    return float(np.sqrt(((n - 1) / n * w + b / n) / w).max())


def summarize(prob: Problem, draws):
    """(worst sd ratio of the last half, of the third quarter, split R-hat of the last half)."""
    if draws is None:
        return None
    n = draws.shape[1]
    ratio = lambda d: float((d.reshape(-1, d.shape[-1]).std(0) / prob.sd).max())  # noqa: E731
    return ratio(draws[:, n // 2:]), ratio(draws[:, n // 2:3 * n // 4]), split_rhat(draws[:, n // 2:])


SETTINGS = {  # name: (N, B, d, features)
    "A": (5000, 100, 5, "gauss"),
    "B": (5000, 100, 5, "t3"),
    "C": (5000, 10, 5, "gauss"),
    "D": (2000, 10, 50, "gauss"),
    "E": (1000, 10, 5, "t3"),
}
R_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def part1(epochs: int) -> None:
    print("== Part 1: ours (torch_sample.SAGALD, float64) vs an independent NumPy SAGA-LD, same batches and noise")
    for name, unit, value in (("A", "u_E", 0.5), ("B", "u_S", 4.0)):  # the step; beyond the SAGA bound
        N, B, d, feat = SETTINGS[name]
        prob = make_problem(N, d, feat)
        h = value / prob.lam_max if unit == "u_E" else value * B / (N * prob.L_max)
        batches = epoch_batches(N, B, epochs, seed=1)
        theta0 = prob.mean.copy()
        t0 = time.perf_counter()
        ours = saga_ld_ours(prob, h, batches, seed=1, theta0=theta0)
        t1 = time.perf_counter()
        ref = saga_ld_reference(prob, h, batches, torch_noise(1, d, len(batches)), theta0)
        diff = np.abs(ours - ref).max() / np.abs(ref).max()
        half = len(batches) // 2
        r_ours = (ours[half:].std(0) / prob.sd).max()
        r_ref = (ref[half:].std(0) / prob.sd).max()
        uE, uS = prob.units(h, B)
        print(f"setting {name}: u_E={uE:.2f} u_S={uS:.2f}, {len(batches)} steps: max |ours - ref| / max |ref| = "
              f"{diff:.1e}; worst sd ratio (1 chain, last half) ours {r_ours:.2f}, reference {r_ref:.2f} "
              f"(ours {1e3 * (t1 - t0) / len(batches):.2f} ms/step)")


def h_rule(prob: Problem, B: int) -> float:
    """The documented stable step: min(1/λ_max(H), B/(N·L_max)), i.e. u_E ≤ 1 and u_S ≤ 1."""
    return min(1.0 / prob.lam_max, B / (prob.N * prob.L_max))


def part2(epochs: int, chains: int) -> None:
    print(f"\n== Part 2: worst sd ratio over the last half of {epochs} epochs, {chains} chains from exact draws "
          "(NumPy float64); r = h / min(1/lambda_max(H), B/(N L_max))")
    print("SAGA-LD column: ratio over the last half (over its first half of it: growing = unstable), split R-hat")
    for name, (N, B, d, feat) in SETTINGS.items():
        prob = make_problem(N, d, feat)
        print(f"\nsetting {name}: N={N} B={B} d={d} {feat}; lambda_max(H)={prob.lam_max:.4g} L_max={prob.L_max:.4g} "
              f"u_S/u_E={prob.N * prob.L_max / (B * prob.lam_max):.2f}")
        print(f"{'r':>5} {'u_E':>6} {'u_S':>6}  {'SGLD':>8} {'SAGA-LD':>24} {'SVRG-LD':>8} {'SGLD-CV':>8}")
        stable_to, still_ok = None, True
        for r in R_GRID:
            h = r * h_rule(prob, B)
            u_E, u_S = prob.units(h, B)
            cells = {m: summarize(prob, run_chains(m, prob, h, B, epochs, chains, seed=7)) for m in METHODS}
            fmt = lambda s: "div" if s is None else f"{s[0]:.2f}"  # noqa: E731
            saga, svrg = cells["saga"], cells["svrg"]
            saga_s = "div" if saga is None else f"{saga[0]:.2f} ({saga[1]:.2f}) {saga[2]:.2f}"
            ok = saga is not None and svrg is not None and saga[0] <= 1.5 * svrg[0]
            still_ok = still_ok and ok
            stable_to = r if still_ok else stable_to
            print(f"{r:>5.2f} {u_E:>6.3f} {u_S:>6.3f}  {fmt(cells['sgld']):>8} {saga_s:>24} {fmt(svrg):>8} "
                  f"{fmt(cells['cv']):>8}", flush=True)
        print(f"SAGA-LD finite with sd ratio <= 1.5 x SVRG-LD's up to r = {stable_to}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="20 epochs, 2 chains")
    parser.add_argument("--part", choices=("1", "2", "all"), default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, chains = (20, 2) if args.quick else (args.epochs, args.chains)
    t0 = time.perf_counter()
    if args.part in ("1", "all"):
        part1(epochs)
    if args.part in ("2", "all"):
        part2(epochs, chains)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
