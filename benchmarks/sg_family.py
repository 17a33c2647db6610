"""Cyclical SG-MCMC against SGLD on a 25-mode 2-D Gaussian mixture (issue 17.3; Zhang et al. 2020, Fig. 2).

The modes sit on the grid {-4, -2, 0, 2, 4}², each N(μ_k, 0.25²·I), equal weights; exact gradients, num_data=1,
loss = U. Both samplers make the same number of steps (the same budget) from the same start; a mode counts as
found when a kept draw lies within 3σ = 0.75 of its centre. SGLD: fixed step h = 0.05. cSGLD: Cyclical with
h0 = ``--h0`` (the cosine's peak, 0.12), ``--cycles`` cycles, exploration fraction ``--exploration`` (0 here: with
exact gradients an exploration phase at T = 0 is plain gradient descent into the nearest mode and cannot leave it;
the exploration it is meant for comes from minibatch noise. Measured, 3000 steps, 6 cycles: SGLD 8/25 modes,
cSGLD 25/25 with exploration=0, 3/25 with exploration=0.5).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/sg_family.py modes --out benchmarks/results

prints the modes found by each and writes benchmarks/results/sg_family_modes.png (draws over the mode grid).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import torch_sample
from torch_sample.schedules import Cyclical

GRID = torch.tensor([[x, y] for x in (-4.0, -2.0, 0.0, 2.0, 4.0) for y in (-4.0, -2.0, 0.0, 2.0, 4.0)])
SD = 0.25


def energy(theta: torch.Tensor) -> torch.Tensor:
    d2 = ((theta[:, None, :] - GRID[None]) ** 2).sum(-1)  # (chains, 25)
    return -torch.logsumexp(-d2 / (2 * SD**2), dim=1).sum()


def run(sampler_fn, steps: int, chains: int, seed: int) -> tuple[torch.Tensor, int]:
    theta = torch.zeros(chains, 2, requires_grad=True)
    sampler = sampler_fn([theta], torch.Generator().manual_seed(seed))
    draws = []
    for _ in range(steps):
        sampler.zero_grad()
        u = energy(theta)
        u.backward()
        sampler.step(loss=u)
        if sampler.stats.get("sampling_phase", 1.0):
            draws.append(theta.detach().clone())
    draws = torch.stack(draws)  # (kept, chains, 2)
    d = ((draws.reshape(-1, 2)[:, None, :] - GRID[None]) ** 2).sum(-1).sqrt()
    found = int((d.min(0).values < 3 * SD).sum())
    return draws, found


def modes(args: argparse.Namespace) -> dict:
    steps = args.steps
    sgld = lambda p, g: torch_sample.SGLD(p, lr=0.05, num_data=1, generator=g)  # noqa: E731
    csgld = lambda p, g: torch_sample.SGLD(p, lr=args.h0, num_data=1, generator=g,  # noqa: E731
                                           schedule=Cyclical(args.cycles, steps, exploration=args.exploration))
    out = {}
    results = {}
    for name, fn in (("SGLD", sgld), ("cSGLD", csgld)):
        draws, found = run(fn, steps, args.chains, args.seed)
        results[name] = draws
        out[name] = {"modes_found": found, "kept_draws": int(draws.shape[0] * draws.shape[1])}
        print(f"{name}: {found}/25 modes found, {out[name]['kept_draws']} kept draws, {steps} steps x {args.chains} "
              "chain(s)")
    if args.out:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
        for ax, (name, draws) in zip(axes, results.items()):
            pts = draws.reshape(-1, 2)[:: max(1, draws.shape[0] * draws.shape[1] // 20000)]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3)
            ax.scatter(GRID[:, 0], GRID[:, 1], marker="x", c="k", s=20)
            ax.set_title(f"{name}: {out[name]['modes_found']}/25 modes ({steps} steps)")
            ax.set_xlim(-6, 6)
            ax.set_ylim(-6, 6)
        fig.tight_layout()
        fig.savefig(directory / "sg_family_modes.png", dpi=100)
        (directory / "sg_family_modes.json").write_text(json.dumps({**out, "args": vars(args)}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("modes", help="cSGLD vs SGLD on the 25-mode mixture")
    m.add_argument("--steps", type=int, default=3000)
    m.add_argument("--chains", type=int, default=1)
    m.add_argument("--cycles", type=int, default=6)
    m.add_argument("--exploration", type=float, default=0.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--h0", type=float, default=0.12)
    m.add_argument("--out", default="")
    args = parser.parse_args()
    if args.what == "modes":
        modes(args)


if __name__ == "__main__":
    main()
