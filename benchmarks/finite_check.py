"""The cost of the SG samplers' divergence check (issue 14.1): one SGLD step (forward, backward, step)
of an MLP 784-512-512-10 at B=128 with the check on and off, interleaved, median of many repeats.

    python benchmarks/finite_check.py [--steps 200] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import torch_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    n, b = 60_000, 128
    x, y = torch.randn(b, 784), torch.randint(10, (b,))
    sampler = torch_sample.SGLD(model.parameters(), lr=1e-6, num_data=n, prior=torch_sample.priors.Normal(1.0))
    idx = torch.arange(b)
    params = [p for p in model.parameters()]

    def steps(check: bool) -> float:
        sampler.check_finite = check
        start = time.perf_counter()
        for _ in range(args.steps):
            sampler.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            sampler.step(indices=idx, loss=loss.detach())
        return (time.perf_counter() - start) / args.steps

    def check_alone() -> float:
        grads = [p.grad for p in params]
        start = time.perf_counter()
        for _ in range(args.steps):
            sampler._finite(grads, loss)
        return (time.perf_counter() - start) / args.steps

    sampler.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    steps(True), steps(False)  # warm up
    on, off, alone = [], [], []
    for _ in range(args.repeats):
        on.append(steps(True))
        off.append(steps(False))
        alone.append(check_alone())
    m_on, m_off, m_alone = (statistics.median(v) * 1e3 for v in (on, off, alone))
    print(f"torch {torch.__version__}, {args.threads} thread(s), MLP 784-512-512-10, B={b}, SGLD, "
          f"median of {args.repeats} x {args.steps} steps")
    print(f"step with check {m_on:.3f} ms, without {m_off:.3f} ms, difference {(m_on - m_off) / m_off:+.2%}; "
          f"the check alone {m_alone:.4f} ms = {m_alone / m_off:.2%} of a step")


if __name__ == "__main__":
    main()
