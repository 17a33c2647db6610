"""Resident memory of a long `vr_mcmc.sample` run that records a large function (issue #6, must-show 3).

A 1M-parameter MLP (784-1024-192-10 on synthetic data), SGLD, one chain, 10,000 draws, recording
the predicted probabilities on 1,000 evaluation inputs (10,000 numbers a draw: 400 MB of float32
over the run). With ``checkpoint=`` the draws go to disk in blocks, so resident memory should stay
flat; the script samples RSS (from /proc/self/status) every 0.2 s and prints it at fractions of
the run, with the size the draws would take in memory. The result is opened lazily at the end.

    python benchmarks/chain_memory.py [--draws 10000] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import arviz  # noqa: F401  (imported up front, as a user has it: its ~50 MB of modules are not draws)
import torch
import torch.nn.functional as F

import torch_sample
import vr_mcmc


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=100, help="checkpoint_every (draws per block)")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 2000
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    x_eval = torch.randn(1000, 784)

    def model_fn():
        return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 192),
                                   torch.nn.ReLU(), torch.nn.Linear(192, 10))

    def sampler_fn(model):
        return torch_sample.SGLD(model.parameters(), lr=1e-6, num_data=n, prior=torch_sample.priors.Normal(1.0))

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def probabilities(model):
        return torch.softmax(model(x_eval), -1)

    size = sum(p.numel() for p in model_fn().parameters())
    directory = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="chain_memory_")) / "run"
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def watch():
        while not done.is_set():
            samples.append((time.perf_counter() - start, rss_mb()))
            time.sleep(0.2)

    base = rss_mb()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    idata = vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (x, y), batch_size=32, num_chains=1, num_warmup=0,
                           num_samples=args.draws, record={"p": probabilities}, checkpoint=directory,
                           checkpoint_every=args.block, progress=False)
    sampled = time.perf_counter() - start
    after_open = rss_mb()
    mean_p = float(idata.posterior["p"].isel(draw=slice(0, 100)).mean())  # reads 100 draws lazily
    done.set()
    thread.join()
    stored = args.draws * 10_000 * 4 / 2**20
    print(f"torch {torch.__version__}, 1 thread; MLP with {size:,} parameters; {args.draws:,} draws of 10,000 numbers "
          f"(float32: {stored:,.0f} MB if held in memory); blocks of {args.block} draws")
    print(f"RSS before sampling: {base:.0f} MB")
    total = samples[-1][0]
    for frac in (0.05, 0.25, 0.5, 0.75, 1.0):
        t, r = min(samples, key=lambda s: abs(s[0] - frac * sampled))
        print(f"  {frac:4.0%} of the run (t = {t:6.1f} s): RSS {r:7.0f} MB")
    peak = max(r for _, r in samples)
    steady = [r for t, r in samples if t > 0.05 * sampled]
    print(f"peak RSS {peak:.0f} MB; after the first 5% of the run RSS ranged {min(steady):.0f}-{max(steady):.0f} MB")
    print(f"after opening the results (lazily): {after_open:.0f} MB; sampling {sampled:.0f} s, total {total:.0f} s; "
          f"mean of the first 100 draws' p: {mean_p:.4f}")
    files = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
    print(f"checkpoint directory: {files:,.0f} MB on disk")
    if not args.out:
        shutil.rmtree(directory.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
