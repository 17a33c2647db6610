"""A small sampling job at module level (picklable for chain_method="parallel"; runnable as a script for
the kill-and-resume test): Bayesian logistic regression on synthetic data."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import torch_sample
import vr_mcmc
import vr_mcmc.data

N, D = 120, 3
_gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_gen)
Y = (X @ torch.tensor([1.5, -1.0, 0.5]) + torch.randn(N, generator=_gen) > 0).float()


def model_fn() -> torch.nn.Module:
    return torch.nn.Linear(D, 1)


def loss_fn(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def log_likelihood(model: torch.nn.Module) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(model(X).squeeze(-1), Y, reduction="none")


def sgld(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.SGLD(model.parameters(), lr=2e-3, num_data=N, prior=torch_sample.priors.Normal(2.0))


def sagald(model: torch.nn.Module) -> torch.optim.Optimizer:
    engine = vr_mcmc.PerExampleGradients(model)
    return torch_sample.SAGALD(model.parameters(), lr=2e-3, num_data=N, engine=engine,
                               prior=torch_sample.priors.Normal(2.0))


def hmc(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.HMC(model.parameters(), lr=0.1, num_data=N, num_leapfrog=5,
                            prior=torch_sample.priors.Normal(2.0))


def ula(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch_sample.ULA(model.parameters(), lr=1e-2, num_data=N, prior=torch_sample.priors.Normal(2.0))


def svrgld_sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SVRG at temperature 0 (deterministic given the batches)."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(vr_mcmc.data.IndexedDataset(TensorDataset(X, Y)), batch_size=40)
    return torch_sample.SVRGLD(model.parameters(), lr=2e-3, num_data=N, snapshot_every=6, loader=loader,
                               loss_fn=lambda x, y: loss_fn(model, (x, y)), temperature=0.0)


SAMPLERS = {"sgld": sgld, "sagald": sagald, "hmc": hmc, "ula": ula, "svrg": svrgld_sgd}


def run(checkpoint=None, sampler="sgld", num_samples=300, **kw):
    options = dict(batch_size=20, num_chains=2, num_warmup=50, num_samples=num_samples, log_likelihood=log_likelihood,
                   observed_data={"y": Y}, seed=3, checkpoint=checkpoint, checkpoint_every=25, progress=False)
    options.update(kw)
    return vr_mcmc.sample(model_fn, SAMPLERS[sampler], loss_fn, (X, Y), **options)


if __name__ == "__main__":  # python chain_job.py DIR SAMPLER NUM_SAMPLES
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
