"""Augmentation and the gradient table: SAGA-LD's and SGLD's ``noise_ratio`` on the digits MLP, with and
without a random shift of the images, through a DataLoader (issue 20).

With augmentation, SAGA's stored row h_i is the gradient of example i as it was augmented at its last visit;
the estimate v = Σ_j h_j + (N/B) Σ_{i∈S} (g_i − h_i) stays unbiased for the augmented likelihood, but g_i − h_i
no longer vanishes as θ settles, since g_i is taken at another shift of the image than h_i. This script
measures how much of SAGA-LD's variance reduction that costs.

Problem: `vr_mcmc.digits.DigitsBNN` (MLP 64-32-10, tanh, N(0, 0.5²) prior, N = 1347 training images of 8×8),
in two regimes of `vr-mcmc demo`: T = 1 and the cold T = 0.1, batch 32, each at the demo's step size (both
methods share it). Augmentation: each visit shifts the 8×8 image by (dy, dx) ∈ {−1, 0, 1}², uniformly, zero
fill, before the training set's standardization (torch's RNG: reproducible per chain). Data:
``DataLoader(dataset of (i, x, y), batch_sampler=UniformIndexSampler(N, 32))``, so both arms see the same
index stream. Measured: ``noise_ratio`` (h²·Var(v)/(2hT·P) per step, the estimator's variance against the
injected noise; see README "Is SGLD already accurate?") averaged over the second half of each chain (SAGA's
table is full by then: every row has been visited at least once), mean over chains.

    python benchmarks/augmentation.py [--passes 10] [--chains 2]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import torch_sample
import vr_mcmc
from torch_sample import priors
from vr_mcmc.data import UniformIndexSampler
from vr_mcmc.digits import DigitsBNN
from vr_mcmc.per_example import PerExampleGradients

REGIMES = (("T = 1", DigitsBNN(), 1.2e-3), ("T = 0.1 (cold)", DigitsBNN(temperature=0.1), 6e-4))
BATCH = 32


def raw_training_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split of `vr_mcmc.digits.load_digits_split`, before standardization: [N, 8, 8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=450, random_state=0, stratify=y)
    return torch.as_tensor(x_train, dtype=torch.float32).reshape(-1, 8, 8), torch.as_tensor(y_train)


class Digits(Dataset):
    """(i, standardized image i, label i); with ``shift``, the image moved by a random (dy, dx) ∈ {−1, 0, 1}²."""

    def __init__(self, shift: bool):
        self.images, self.labels = raw_training_images()
        flat = self.images.reshape(len(self.images), -1).double()
        self.mean, self.std = flat.mean(0).float(), flat.std(0, unbiased=False).float()
        self.std[self.std == 0] = 1.0
        self.shift = shift

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple:
        image = self.images[i]
        if self.shift:
            dy, dx = (torch.randint(-1, 2, (2,)) + 1).tolist()
            image = F.pad(image, (1, 1, 1, 1))[dy:dy + 8, dx:dx + 8]
        return i, (image.reshape(64) - self.mean) / self.std, self.labels[i]


def loss_fn(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(problem: DigitsBNN, method: str, lr: float, shift: bool, passes: float, chains: int) -> tuple[float, float]:
    """(mean noise_ratio over the second half of each chain, seconds)."""
    dataset = Digits(shift)
    n = len(dataset)
    loader = DataLoader(dataset, batch_sampler=UniformIndexSampler(n, BATCH))
    cls = torch_sample.SAGALD if method == "SAGA-LD" else torch_sample.SGLD

    def sampler_fn(model):
        sampler = cls(model.parameters(), lr, n, prior=priors.Normal(problem.prior_std),
                      temperature=problem.temperature, engine=PerExampleGradients(model, check=False))
        sampler.noise_ratio_every = 1
        return sampler

    steps = math.ceil(passes * n / BATCH)
    start = time.perf_counter()
    idata = vr_mcmc.sample(problem.model, sampler_fn, loss_fn, loader, num_warmup=0, num_samples=steps,
                           num_chains=chains, record=[], seed=0, progress=False)
    ratio = idata.sample_stats["noise_ratio"].values[:, steps // 2:]
    return float(np.nanmean(ratio)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=float, default=10.0)
    parser.add_argument("--chains", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    check = Digits(shift=False)
    x, y, _, _ = DigitsBNN().data()
    assert torch.allclose(torch.stack([check[i][1] for i in range(len(check))]), x, atol=1e-5)
    assert torch.equal(check.labels, y)  # the same training set as the demo's
    print(f"torch {torch.__version__}, 1 thread, load {os.getloadavg()[0]:.1f}; batch {BATCH}, "
          f"{args.passes:g} passes, {args.chains} chains; noise_ratio averaged over the second half of each chain")
    print(f"{'regime':<16}{'method':<9}{'h':>9}{'no shift':>11}{'shift':>11}{'shift/none':>12}")
    for title, problem, lr in REGIMES:
        row = {}
        for method in ("SGLD", "SAGA-LD"):
            plain, t0 = run(problem, method, lr, False, args.passes, args.chains)
            shifted, t1 = run(problem, method, lr, True, args.passes, args.chains)
            row[method] = (plain, shifted)
            print(f"{title:<16}{method:<9}{lr:>9.1e}{plain:>11.4f}{shifted:>11.4f}{shifted / plain:>12.2f}"
                  f"   ({t0:.0f} s, {t1:.0f} s)", flush=True)
        (sg, sg_shift), (saga, saga_shift) = row["SGLD"], row["SAGA-LD"]
        print(f"{'':<16}SAGA-LD / SGLD: {saga / sg:.3f} without the shift, {saga_shift / sg_shift:.3f} with it")
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
