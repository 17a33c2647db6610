"""SAGA-LD step time with one and with two torch intra-op threads, on a small and a mid-sized MLP (issue 16.5).

    python benchmarks/threads.py [--steps 200]

Prints ms per step (median of 5 repeats of ``--steps`` steps each, after a warm-up), per thread count.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch
import torch.nn.functional as F

import torch_sample
from vr_mcmc.models import mlp
from vr_mcmc.per_example import PerExampleGradients


def step_ms(sizes: tuple[int, ...], batch: int, threads: int, steps: int, num_data: int = 2048) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mlp(sizes)
    x, y = torch.randn(num_data, sizes[0]), torch.randint(0, sizes[-1], (num_data,))
    sampler = torch_sample.SAGALD(model.parameters(), lr=1e-6, num_data=num_data,
                                  engine=PerExampleGradients(model), prior=torch_sample.priors.Normal(1.0))

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            idx = torch.randperm(num_data)[:batch]
            sampler.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            sampler.step(indices=idx, loss=loss.detach())
        return (time.perf_counter() - start) / n * 1e3

    run(20)
    return statistics.median(run(steps) for _ in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    for sizes, batch in (((64, 32, 10), 32), ((784, 512, 512, 10), 128)):
        times = {t: step_ms(sizes, batch, t, args.steps if sizes[0] < 100 else max(args.steps // 10, 10))
                 for t in (1, 2)}
        params = sum(a * b + b for a, b in itertools.pairwise(sizes))
        print(f"MLP {'-'.join(map(str, sizes))} ({params:,} params), B={batch}: "
              + ", ".join(f"{t} thread(s) {ms:.2f} ms/step" for t, ms in times.items()))


if __name__ == "__main__":
    main()
