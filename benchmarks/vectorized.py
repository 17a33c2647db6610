"""Vectorized chains (issue 19, must-show 1 and 2): correctness against sequential chains, and time per step.

    python benchmarks/vectorized.py [--part correctness|throughput|runs|all] [--chains 1 4 16 64] [--quick]

Correctness (one thread):
- Gaussian: Bayesian linear regression (analytic Gaussian posterior), 8 chains of SGLD and of HMC, vectorized and
  sequential with the same seed: the largest difference between the draws (the same chains up to float order),
  and each run's posterior mean and sd against the exact ones, in Monte Carlo standard errors (ArviZ's mcse).
- A posteriordb reference posterior (eight schools, non-centred; tests/data/refposteriors): 4 vectorized NUTS
  chains against the reference draws, with the criteria of tests/test_refposterior_sampling.py (mean within 4
  MCSE, sd within 10%, R-hat < 1.01).
Throughput (one torch thread; the demo's MLP 64-32-10 on the digits, N = 1347): wall time per step of C vectorized
chains, eager and compiled (``vectorized_compile=True``), through `vr_mcmc.sample` with a recorded function of the
model per draw, for SGLD (B = 32), SAGA-LD (B = 32, noise_ratio_every=0) and HMC (full data, 8 leapfrog steps),
relative to one chain of the same kind and to one sequential chain, and of 16 sequential chains. A step's time is
read from the draws' own time stamps (a recorded clock), after the first fifth of each run: set-up, compilation and
merging are left out (medians of ``--repeats`` runs, the configurations interleaved). chain_method="parallel"
(2 worker processes at a time on this 2-core machine) has no shared clock: "runs" gives the wall time of whole
runs of 16 chains with each chain_method, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import torch_sample
import vr_mcmc
from vr_mcmc.digits import DigitsBNN

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

# -- the demo's posterior, at module level (picklable for chain_method="parallel") ---------------------------------

PROBLEM = DigitsBNN()
X, Y, _, _ = PROBLEM.data()
N = len(X)
PRIOR = torch_sample.priors.Normal(PROBLEM.prior_std)


def model_fn() -> torch.nn.Module:
    return PROBLEM.model()


def loss_fn(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def sgld(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.SGLD(model.parameters(), lr=1e-4, num_data=N, prior=PRIOR)


def sagald(model: torch.nn.Module) -> torch.optim.Optimizer:
    sampler = torch_sample.SAGALD(model.parameters(), lr=1e-4, num_data=N, prior=PRIOR,
                                  engine=vr_mcmc.PerExampleGradients(model))
    sampler.noise_ratio_every = 0  # the diagnostic off, as in a production run
    return sampler


def hmc(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.HMC(model.parameters(), lr=2e-3, num_data=N, num_leapfrog=8, prior=PRIOR)


def first_bias(model: torch.nn.Module) -> torch.Tensor:
    return model[-1].bias


METHODS = {"SGLD": (sgld, 32), "SAGA-LD": (sagald, 32), "HMC": (hmc, 32)}


def run_time(method: str, chains: int, chain_method: str, steps: int, compiled: bool | None = None) -> float:
    sampler_fn, batch = METHODS[method]
    extra = {} if chain_method != "vectorized" or compiled is None else {"vectorized_compile": compiled}
    start = time.perf_counter()
    vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), batch_size=batch, num_warmup=0, num_samples=steps,
                   num_chains=chains, chain_method=chain_method, progress=False, record={"b": first_bias},
                   checkpoint_every=100_000, seed=0, **extra)
    return time.perf_counter() - start


_ORIGIN = time.perf_counter()


def _clock(model: torch.nn.Module) -> torch.Tensor:
    """A recorded function: the time of the draw (float64 seconds since the benchmark started)."""
    return torch.tensor(time.perf_counter() - _ORIGIN, dtype=torch.float64)


def step_ms(method: str, chains: int, chain_method: str, steps: int, compiled: bool = False) -> float:
    """ms per step of one run, from the draws' own time stamps: the mean time between the draws of each chain
    after the first fifth of the run (which holds the start-up and a compilation), summed over chains that run one
    after another (sequential), of chain 0 for chains that step together (vectorized). Set-up, compilation and
    the merging of the draws are left out; the rest of each step (batch streams, recording) is in."""
    sampler_fn, batch = METHODS[method]
    extra = {} if chain_method != "vectorized" else {"vectorized_compile": compiled}
    idata = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (X, Y), batch_size=batch, num_warmup=0, num_samples=steps,
                           num_chains=chains, chain_method=chain_method, progress=False,
                           record={"b": first_bias, "t": _clock}, checkpoint_every=100_000, seed=0, **extra)
    t = np.asarray(idata.posterior["t"].values, dtype=np.float64)  # [chain, draw]
    k0 = steps // 5
    per_chain = (t[:, -1] - t[:, k0]) / (steps - 1 - k0)
    return float(per_chain.sum() if chain_method == "sequential" else per_chain[0]) * 1e3


def throughput(chain_counts: list[int], quick: bool, repeats: int) -> dict:
    """Per method: ms per step of each configuration (median of ``repeats``; the configurations interleaved in each
    repeat, so that a drift of the load on this shared machine reaches them alike)."""
    out: dict = {}
    for method in METHODS:
        steps = {"SGLD": 400, "SAGA-LD": 200, "HMC": 16}[method]  # a run of a few seconds here
        if quick:
            steps //= 2
        configs = [(f"vectorized {c}", c, "vectorized", False) for c in chain_counts]
        configs += [(f"compiled {c}", c, "vectorized", True) for c in chain_counts]
        configs += [("sequential 1", 1, "sequential", False), ("sequential 16", 16, "sequential", False)]
        for how in ("sequential", "vectorized"):  # first calls pay one-time costs (imports, torch.func set-up)
            run_time(method, 2, how, 2)
        times: dict = {label: [] for label, *_ in configs}
        for _ in range(repeats):
            for label, c, how, compiled in configs:
                n = steps if c <= 16 or method != "HMC" else max(6, steps // 2)
                times[label].append(step_ms(method, c, how, n, compiled))
        res = {label: float(np.median(v)) for label, v in times.items()}
        for label, v in res.items():
            print(f"{method:8s} {label:15s}: {v:9.2f} ms/step  (runs: {', '.join(f'{x:.2f}' for x in times[label])})",
                  flush=True)
        out[method] = res
    return out


def whole_runs(chains: int = 16) -> dict:
    """Wall time of one whole `vr_mcmc.sample` call of ``chains`` chains per chain_method, start-up included (for
    "parallel": 2 worker processes at a time, each importing torch and building its chain)."""
    out: dict = {}
    for method, steps in (("SGLD", 1000), ("SAGA-LD", 1000), ("HMC", 20)):
        out[method] = {"steps": steps}
        for how in ("vectorized", "sequential", "parallel"):
            out[method][how] = run_time(method, chains, how, steps)
            print(f"{method:8s} {chains} chains x {steps} steps, {how:10s}: {out[method][how]:7.1f} s", flush=True)
    return out


# -- correctness -----------------------------------------------------------------------------------------------------

BLR_N, BLR_D, BLR_SIGMA, BLR_PRIOR = 200, 3, 1.0, 1.0
_g = torch.Generator().manual_seed(3)
BLR_X = torch.randn(BLR_N, BLR_D, generator=_g, dtype=torch.float64)
BLR_Y = BLR_X @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + BLR_SIGMA * torch.randn(
    BLR_N, generator=_g, dtype=torch.float64)


def blr_model() -> torch.nn.Module:
    return torch.nn.Linear(BLR_D, 1, bias=False).double()


def blr_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x).squeeze(-1) - y) ** 2).mean() / BLR_SIGMA**2


def blr_sgld(model):
    return torch_sample.SGLD(model.parameters(), lr=2e-4, num_data=BLR_N, prior=torch_sample.priors.Normal(BLR_PRIOR))


def blr_hmc(model):
    return torch_sample.HMC(model.parameters(), lr=0.05, num_data=BLR_N, num_leapfrog=5,
                            prior=torch_sample.priors.Normal(BLR_PRIOR))


def blr_exact() -> tuple[np.ndarray, np.ndarray]:
    precision = BLR_X.T @ BLR_X / BLR_SIGMA**2 + torch.eye(BLR_D, dtype=torch.float64) / BLR_PRIOR**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (BLR_X.T @ BLR_Y) / BLR_SIGMA**2
    return mean.numpy(), cov.diagonal().sqrt().numpy()


def gaussian(quick: bool) -> dict:
    import arviz as az

    mean, sd = blr_exact()
    out = {}
    draws = 500 if quick else 2000
    for name, fn, batch in (("SGLD", blr_sgld, 20), ("HMC", blr_hmc, 20)):
        runs = {}
        for how in ("sequential", "vectorized"):
            idata = vr_mcmc.sample(blr_model, fn, blr_loss, (BLR_X, BLR_Y), batch_size=batch, num_warmup=200,
                                   num_samples=draws, num_chains=8, seed=11, chain_method=how, progress=False)
            runs[how] = idata.posterior["weight"].values.reshape(8, draws, BLR_D)
        diff = float(np.abs(runs["sequential"] - runs["vectorized"]).max())
        res = {"max_abs_draw_difference": diff}
        for how, w in runs.items():
            z_mean = [(w[..., d].mean() - mean[d]) / float(az.mcse(w[..., d])) for d in range(BLR_D)]
            sd_ratio = [w[..., d].std() / sd[d] for d in range(BLR_D)]
            res[how] = {"mean_z": [round(float(z), 2) for z in z_mean],
                        "sd_ratio": [round(float(r), 3) for r in sd_ratio]}
        out[name] = res
        print(f"Gaussian {name}: max |draw difference| {diff:.2e}; " + "; ".join(
            f"{how}: mean z {res[how]['mean_z']}, sd ratio {res[how]['sd_ratio']}" for how in runs), flush=True)
    return out


def reference_posterior(quick: bool) -> dict:
    import arviz as az
    import refposteriors

    if not refposteriors.available():
        return {"skipped": refposteriors.unavailable_reason()}
    post = refposteriors.POSTERIORS["eight_schools-eight_schools_noncentered"]

    def nuts(model):
        return torch_sample.NUTS(model.parameters(), lr=0.1, num_data=1)

    warmup, draws = (300, 500) if quick else (500, 1000)
    start = time.perf_counter()
    idata = vr_mcmc.sample(post.module(), nuts, post.loss, torch.zeros(1), batch_size=1, num_warmup=warmup,
                           num_samples=draws, num_chains=4, seed=5, chain_method="vectorized", progress=False)
    wall = time.perf_counter() - start
    theta = torch.from_numpy(np.asarray(idata.posterior["theta"].values))
    ours = post.to_params(theta)
    reference = post.reference()
    rows, failures = {}, []
    for param in post.param_names:
        x, ref = ours[param].numpy(), reference[param]
        se = float(np.hypot(az.mcse(x), az.mcse(ref)))
        z = abs(x.mean() - ref.mean()) / se
        ratio = x.std(ddof=1) / ref.std(ddof=1)
        rhat = float(az.rhat(x))
        rows[param] = {"z": round(float(z), 2), "sd_ratio": round(float(ratio), 3), "rhat": round(rhat, 4)}
        if not (z < 4 and abs(ratio - 1) < 0.1 and rhat < 1.01):
            failures.append(param)
    print(f"eight schools (non-centred), 4 vectorized NUTS chains x {draws}: {wall:.0f} s; "
          f"failed: {failures or 'none'}")
    for param, row in rows.items():
        print(f"  {param:9s} mean off {row['z']:5.2f} MCSE, sd ratio {row['sd_ratio']:.3f}, R-hat {row['rhat']:.4f}")
    return {"params": rows, "failed": failures, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("correctness", "throughput", "runs", "all"), default="all")
    parser.add_argument("--chains", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file (default: results/vectorized[_PART].json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {"load_before": os.getloadavg()}
    if args.part in ("correctness", "all"):
        results["gaussian"] = gaussian(args.quick)
        results["reference"] = reference_posterior(args.quick)
    if args.part in ("throughput", "all"):
        res = throughput(args.chains, args.quick, args.repeats)
        results["throughput_ms_per_step"] = res
        print("\nper step, relative to one chain of the same kind (and to one sequential chain):")
        for method, r in res.items():
            seq = r["sequential 1"]
            cells = []
            for k, v in r.items():
                one = r.get(f"{k.split()[0]} 1", seq)
                cells.append(f"{k}: {v / one:.2f}x ({v / seq:.2f}x)")
            print(f"  {method}: " + "; ".join(cells))
    if args.part in ("runs", "all"):
        results["whole_runs_s"] = whole_runs()
    results["load_after"] = os.getloadavg()
    out = Path(args.out or ROOT / "results" / f"vectorized{'' if args.part == 'all' else '_' + args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"load after {os.getloadavg()[0]:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
