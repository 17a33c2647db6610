"""NUTS divergences on eight schools (non-centred): how our warmup's end changes them, against NumPyro (issue 18).

The issue asks for no divergences where Stan has none. This posterior has a few even in Stan's algorithm at
``adapt_delta`` 0.8, so the comparison is a distribution over seeds, side by side with NumPyro's NUTS (Stan's
algorithm in JAX): per seed, 4 chains from over-dispersed starts (``initial_point(scale=2)``, chain c of seed s
seeded 1000·s + c as in ``tests/test_refposterior_sampling.py``), 1000 warmup steps (dual averaging to 0.8, Stan's
windowed metric, diagonal or ``--dense``), 1000 draws, max tree depth 10. Ours with both ends of the warmup
(``step_size_tuning="stan"``, NUTS's default, and ``"calm"``). Printed per seed: post-warmup divergences of 4,000
draws, mean acceptance statistic, adapted step sizes, leapfrog steps per draw.

Run: ``python benchmarks/nuts_divergences.py [--seeds 3] [--dense] [--samplers stan,calm,numpyro]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import refposteriors

import torch_sample

NAME = "eight_schools-eight_schools_noncentered"
CHAINS, WARMUP, DRAWS = 4, 1000, 1000


def starts(post, seed):
    return [post.initial_point(torch.Generator().manual_seed(1000 * seed + c), scale=2.0) for c in range(CHAINS)]


def ours(post, seed, dense, tuning):
    out = []
    for chain in range(CHAINS):
        g = torch.Generator().manual_seed(1000 * seed + chain)  # the start, then the chain, as in starts()
        theta = post.initial_point(g, scale=2.0).requires_grad_(True)
        nuts = torch_sample.NUTS([theta], lr=0.1, generator=g, dense_mass=dense, step_size_tuning=tuning)
        closure = torch_sample.log_density_closure(post.log_density, theta)
        nuts.adapt(True, num_warmup=WARMUP)
        for _ in range(WARMUP):
            nuts.step(closure)
        nuts.adapt(False)
        div, acc, steps = 0, [], 0
        for _ in range(DRAWS):
            nuts.step(closure)
            div += int(nuts.stats["diverging"])
            acc.append(nuts.stats["acceptance_rate"])
            steps += nuts.stats["n_steps"]
        out.append((div, float(np.mean(acc)), nuts.step_size, steps))
    return out


class NumPyro:
    def __init__(self, dense):
        import jax
        from exact_samplers import POSTERIORS, jax_log_density
        from numpyro.infer.hmc import hmc

        ld = jax_log_density(POSTERIORS[NAME], POSTERIORS[NAME].data())
        self.init_kernel, sample_kernel = hmc(potential_fn=lambda th: -ld(th), algo="NUTS")
        self.dense = dense

        def loop(state, n):
            def body(s, _):
                s = sample_kernel(s)
                return s, (s.diverging, s.mean_accept_prob, s.num_steps)
            return jax.lax.scan(body, state, None, length=n)

        self.warmup = jax.jit(lambda s: loop(s, WARMUP)[0])
        self.sample = jax.jit(lambda s: loop(s, DRAWS))

    def __call__(self, post, seed):
        import jax

        out = []
        for chain, start in enumerate(starts(post, seed)):
            state = self.init_kernel(jax.numpy.asarray(start.numpy()), WARMUP, adapt_step_size=True,
                                     adapt_mass_matrix=True, dense_mass=self.dense, target_accept_prob=0.8,
                                     max_tree_depth=10, rng_key=jax.random.PRNGKey(1000 * seed + chain))
            state, (d, a, n) = self.sample(self.warmup(state))
            out.append((int(np.asarray(d).sum()), float(np.asarray(a).mean()),
                        float(state.adapt_state.step_size), int(np.asarray(n).sum())))
        return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--samplers", default="stan,calm,numpyro")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    post = refposteriors.POSTERIORS[NAME]
    runners = {}
    for name in args.samplers.split(","):
        if name == "numpyro":
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
            import jax

            jax.config.update("jax_enable_x64", True)
            runners[name] = NumPyro(args.dense)
        else:
            runners[name] = lambda p, s, t=name: ours(p, s, args.dense, t)
    metric = "dense" if args.dense else "diag"
    for seed in range(args.seeds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            chains = run(post, seed)
            div = sum(c[0] for c in chains)
            print(f"{name:8s} {metric} seed {seed}: divergences {div}/{CHAINS * DRAWS}, "
                  f"acceptance {np.mean([c[1] for c in chains]):.3f}, "
                  f"step sizes {np.round([c[2] for c in chains], 3).tolist()}, "
                  f"leapfrogs/draw {sum(c[3] for c in chains) / (CHAINS * DRAWS):.1f} "
                  f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
