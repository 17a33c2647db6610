"""Sampler step times of two versions of the code, measured in turn (issue 15: "step times unchanged").

    python benchmarks/step_times.py --before /path/to/old/checkout       # e.g. a git worktree of 12f520a
    python benchmarks/step_times.py --before OLD --rounds 3 --steps 60

Each round runs, in a fresh process per version and alternating the versions, the median time of a
step of: SGLD and SAGA-LD on an MLP 784-512-512-10 at batch 128 (N = 10,000, random data), SAGA-LD on
the demo's MLP 64-32-10 at batch 32, HMC (10 leapfrog steps) on a 10-D Gaussian and on a small MLP's
full-data posterior (N = 500). One torch thread. Printed: per case the median over rounds of each
version and their ratio (after / before).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

CASES = ("SGLD mlp784 B128", "SAGA-LD mlp784 B128", "SAGA-LD mlp64 B32", "HMC gauss10 L10", "HMC mlp N500 L10")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure(steps: int) -> dict[str, float]:
    """Median seconds per step of each case, with whatever `torch_sample` / `vr_mcmc` are importable."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import torch_sample
    from vr_mcmc.per_example import PerExampleGradients

    torch.set_num_threads(1)
    out = {}

    def sg(method, sizes, n, b):
        torch.manual_seed(0)
        layers = []
        for i, (a, c) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, c))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
        if method == "SGLD":
            sampler = torch_sample.SGLD(model.parameters(), lr=1e-6, num_data=n)
        else:
            sampler = torch_sample.SAGALD(model.parameters(), lr=1e-6, num_data=n,
                                          engine=PerExampleGradients(model, check=False))
        if hasattr(sampler, "noise_ratio_every"):
            sampler.noise_ratio_every = 0  # the old code has no diagnostic: time the same work
        times = []
        gen = torch.Generator().manual_seed(0)
        for k in range(steps + 5):
            idx = torch.randperm(n, generator=gen)[:b]
            t0 = time.perf_counter()
            sampler.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            sampler.step(indices=idx)
            if k >= 5:
                times.append(time.perf_counter() - t0)
        return _median(times)

    def hmc(closure_of):
        theta, closure = closure_of()
        sampler = torch_sample.HMC([theta], lr=0.05, num_leapfrog=10, generator=torch.Generator().manual_seed(0))
        times = []
        for k in range(steps + 5):
            t0 = time.perf_counter()
            sampler.step(closure)
            if k >= 5:
                times.append(time.perf_counter() - t0)
        return _median(times)

    def gauss():
        theta = torch.zeros(10, requires_grad=True)
        return theta, torch_sample.log_density_closure(lambda t: -0.5 * (t * t).sum(), theta)

    def mlp_posterior():
        torch.manual_seed(0)
        x, y = torch.randn(500, 10), torch.randint(0, 3, (500,))
        theta = (0.1 * torch.randn(10 * 16 + 16 + 16 * 3 + 3)).requires_grad_(True)

        def log_density(t):
            w1, b1 = t[:160].reshape(16, 10), t[160:176]
            w2, b2 = t[176:224].reshape(3, 16), t[224:]
            logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2
            return -F.cross_entropy(logits, y, reduction="sum") - 0.5 * (t * t).sum()

        return theta, torch_sample.log_density_closure(log_density, theta)

    out[CASES[0]] = sg("SGLD", (784, 512, 512, 10), 10_000, 128)
    out[CASES[1]] = sg("SAGA-LD", (784, 512, 512, 10), 10_000, 128)
    out[CASES[2]] = sg("SAGA-LD", (64, 32, 10), 1347, 32)
    out[CASES[3]] = hmc(gauss)
    out[CASES[4]] = hmc(mlp_posterior)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="checkout of the earlier code (its repository root)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.steps)))
        return 0
    versions = {"before": Path(args.before).resolve(), "after": HERE.parents[1]} if args.before else \
        {"after": HERE.parents[1]}
    results: dict[str, dict[str, list[float]]] = {v: {c: [] for c in CASES} for v in versions}
    for _ in range(args.rounds):
        for name, root in versions.items():
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
            run = subprocess.run([sys.executable, str(HERE), "--measure", "--steps", str(args.steps)], env=env,
                                 capture_output=True, text=True, cwd=root, check=True)
            for case, value in json.loads(run.stdout.strip().splitlines()[-1]).items():
                results[name][case].append(value)
    print(f"{'case':<22}" + "".join(f"{v + ' ms':>12}" for v in versions) + ("  after/before" if args.before else ""))
    for case in CASES:
        meds = {v: _median(results[v][case]) * 1e3 for v in versions}
        ratio = f"{meds['after'] / meds['before']:>14.2f}" if args.before else ""
        print(f"{case:<22}" + "".join(f"{m:>12.3f}" for m in meds.values()) + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
