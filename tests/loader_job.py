"""A sampling job through a DataLoader with a random augmentation (module level, runnable as a script for the
kill-and-resume test): chain_job's logistic regression, SAGA-LD, batches of 20 drawn by a UniformIndexSampler."""

from __future__ import annotations

import sys

import chain_job
import torch
from torch.utils.data import DataLoader, Dataset

import vr_mcmc
from vr_mcmc.data import UniformIndexSampler

X, Y, N = chain_job.X, chain_job.Y, chain_job.N


class Shifted(Dataset):
    """(i, x_i + 0.3·ξ, y_i), ξ ~ N(0, I) from torch's RNG: an augmentation, random at each visit."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple:
        return i, X[i] + 0.3 * torch.randn(X.shape[1]), Y[i]


def loader(workers: int = 2) -> DataLoader:
    return DataLoader(Shifted(), batch_sampler=UniformIndexSampler(N, 20), num_workers=workers)


def run(checkpoint=None, num_samples: int = 150, workers: int = 2):
    return vr_mcmc.sample(chain_job.model_fn, chain_job.sagald, chain_job.loss_fn, loader(workers), num_chains=2,
                          num_warmup=10, num_samples=num_samples, seed=3, checkpoint=checkpoint, checkpoint_every=7,
                          progress=False, log_likelihood=chain_job.log_likelihood)


if __name__ == "__main__":  # python loader_job.py DIR NUM_SAMPLES
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]))
