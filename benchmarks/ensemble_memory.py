"""Resident memory of a posterior ensemble of a 1M-parameter model (issue 20, must-show 1).

An MLP 784-1024-192-10 (1,002,570 parameters, 3.8 MiB of float32 a draw), sampled by SGLD on synthetic data with
``vr_mcmc.sample(..., keep_params=2)``: 2 chains × 60 kept draws = 120 parameter draws on disk. Then
``PosteriorEnsemble(dir, model).evaluate((x, y))`` on 2,000 inputs, with RSS (from /proc/self/status) sampled every
20 ms: it should stay flat as the draws go by (one draw in memory at a time), far below the 120 draws' size. The
predictive ``ensemble.predict(x)`` is checked against the mean of the draws' softmax computed by hand (each file
read with safetensors' own ``load_file`` into a fresh model, float64 sums).

    python benchmarks/ensemble_memory.py [--draws-per-chain 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import arviz  # noqa: F401  (imported up front, as a user has it: its modules are not draws)
import numpy as np
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


class Watch:
    """RSS every ``every`` seconds in a thread, with the time since start."""

    def __init__(self, every: float = 0.02):
        self.every, self.samples, self.done = every, [], threading.Event()
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter() - self.start, rss_mb()))
            time.sleep(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.thread.join()
        return self.samples


def report(samples: list[tuple[float, float]], duration: float, draws: int, draw_mb: float, what: str) -> None:
    """RSS at fractions of a phase (draws go by at a steady rate), its range after the first 25% (the first
    checkpoints and the allocator's growth come before), its peak, and the slope of a straight line fitted to RSS
    against the draws done over that range (MB per draw)."""
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        t, r = min(samples, key=lambda s: abs(s[0] - frac * duration))
        print(f"  {frac:4.0%} of the {what} (t = {t:5.1f} s): RSS {r:6.0f} MB")
    steady = np.array([(t, r) for t, r in samples if t > 0.25 * duration])
    slope = np.polyfit(steady[:, 0] / duration * draws, steady[:, 1], 1)[0]
    peak = max(r for _, r in samples)
    print(f"  peak RSS {peak:.0f} MB; after the first 25% RSS ranged {steady[:, 1].min():.0f}-{steady[:, 1].max():.0f} "
          f"MB, fitted slope {slope:+.3f} MB per draw (holding the draws would be {draw_mb:+.1f} MB per draw)")


def model_fn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 192),
                               torch.nn.ReLU(), torch.nn.Linear(192, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws-per-chain", type=int, default=60)
    parser.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, keep, chains = 2000, 2, 2
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    x_eval, y_eval = torch.randn(2000, 784), torch.randint(0, 10, (2000,))

    def sampler_fn(model):
        return torch_sample.SGLD(model.parameters(), lr=1e-6, num_data=n, prior=torch_sample.priors.Normal(1.0))

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    size = sum(p.numel() for p in model_fn().parameters())
    draw_mb = size * 4 / 2**20
    directory = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ensemble_memory_")) / "run"
    initial = rss_mb()
    sampling = Watch()
    vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (x, y), batch_size=32, num_chains=chains, num_warmup=0,
                   num_samples=args.draws_per_chain * keep, keep_params=keep, record={}, checkpoint=directory,
                   checkpoint_every=20, progress=False)
    sampling_samples = sampling.stop()
    sampled = sampling_samples[-1][0]
    on_disk = sum(p.stat().st_size for p in (directory / "params").iterdir()) / 2**20

    ensemble = vr_mcmc.PosteriorEnsemble(directory, model_fn(), batch_size=500)
    total = len(ensemble)
    before = rss_mb()
    watch = Watch()
    scores = ensemble.evaluate((x_eval, y_eval))
    samples = watch.stop()
    evaluated = samples[-1][0]

    predictive = ensemble.predict(x_eval).numpy()
    from safetensors.torch import load_file

    hand = np.zeros((len(x_eval), 10))
    fresh = model_fn().eval()
    for i in range(total):
        fresh.load_state_dict(load_file(str(ensemble.path(i))))
        with torch.no_grad():
            hand += fresh(x_eval).double().softmax(-1).numpy()
    hand /= total
    diff = float(np.abs(predictive - hand).max())

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, 1 thread, load {load:.1f}; MLP with {size:,} parameters ({draw_mb:.1f} MiB a "
          f"draw); {chains} chains x {args.draws_per_chain} kept draws = {total} draws ({total * draw_mb:,.0f} MiB if "
          f"held in memory; {on_disk:,.0f} MiB on disk); sampling {sampled:.0f} s")
    print(f"sample(keep_params={keep}): RSS before {initial:.0f} MB")
    report(sampling_samples, sampled, total // chains * chains, draw_mb, "kept draws")
    print(f"evaluate on {len(x_eval):,} inputs: {evaluated:.1f} s ({evaluated / total * 1000:.0f} ms a draw); "
          f"log-lik {scores['log_likelihood']:.4f}, accuracy {scores['accuracy']:.3f}, ECE {scores['ece']:.4f}, "
          f"Brier {scores['brier']:.4f}")
    print(f"evaluate: RSS before {before:.0f} MB")
    report(samples, evaluated, total, draw_mb, "draws")
    print(f"predictive vs the mean of the {total} draws' softmax by hand (safetensors.load_file, fresh model, float64 "
          f"sums): max |difference| {diff:.2e}")
    if not args.out:
        shutil.rmtree(directory.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
