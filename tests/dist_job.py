"""Sampling jobs for the torch.distributed tests, at module level: Bayesian logistic regression on synthetic
float64 data (float64 so that a data-parallel chain can be compared with one process at a tight tolerance).

As a script it is one rank of a run, started the way torchrun starts it (the environment variables WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): see `main`. MODE "chains" or "data"."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch_sample
import vr_mcmc
import vr_mcmc.data
from torch_sample.priors import Normal

N, D = 120, 3
_gen = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_gen, dtype=torch.float64)
Y = (X @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64) + torch.randn(N, generator=_gen, dtype=torch.float64)
     > 0).double()
LR = 2e-3


def model_fn() -> torch.nn.Module:
    return torch.nn.Linear(D, 1).double()


def loss_fn(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def sgld(model):
    return torch_sample.SGLD(model.parameters(), lr=LR, num_data=N, prior=Normal(2.0))


def sagald(model):
    return torch_sample.SAGALD(model.parameters(), lr=LR, num_data=N, engine=vr_mcmc.PerExampleGradients(model),
                               prior=Normal(2.0))


def svrgld(model):
    loader = DataLoader(vr_mcmc.data.IndexedDataset(TensorDataset(X, Y)), batch_size=40)
    return torch_sample.SVRGLD(model.parameters(), lr=LR, num_data=N, snapshot_every=6, loader=loader,
                               loss_fn=lambda x, y: loss_fn(model, (x, y)), prior=Normal(2.0))


def sghmc(model):
    return torch_sample.SGHMC(model.parameters(), lr=0.02, num_data=N, friction=5.0, prior=Normal(2.0))


def psgld(model):
    return torch_sample.PSGLD(model.parameters(), lr=1e-3, num_data=N, prior=Normal(2.0))


def sgnht(model):
    return torch_sample.SGNHT(model.parameters(), lr=0.02, num_data=N, prior=Normal(2.0))


def hmc(model):
    return torch_sample.HMC(model.parameters(), lr=0.1, num_data=N, num_leapfrog=5, prior=Normal(2.0))


def sagald_blocks(model):  # a partitioned table: refused data parallel
    return torch_sample.SAGALD(model.parameters(), lr=LR, num_data=N, engine=vr_mcmc.PerExampleGradients(model),
                               block_size=4)


def sghmc_auto(model):  # beta="auto" needs the whole batch's per-example gradients: refused data parallel
    return torch_sample.SGHMC(model.parameters(), lr=0.02, num_data=N, friction=5.0, beta="auto",
                              engine=vr_mcmc.PerExampleGradients(model))


SAMPLERS = {"sgld": sgld, "sagald": sagald, "svrgld": svrgld, "sghmc": sghmc, "psgld": psgld, "sgnht": sgnht,
            "hmc": hmc, "sagald_blocks": sagald_blocks, "sghmc_auto": sghmc_auto}


def run(mode: str, sampler: str, checkpoint=None, num_samples: int = 200, data=None, **kw):
    options = dict(batch_size=20, num_chains=3, num_warmup=0, num_samples=num_samples, record=["weight", "bias"],
                   seed=3, checkpoint=checkpoint, checkpoint_every=20, progress=False,
                   data_parallel=mode == "data")
    options.update(kw)
    return vr_mcmc.sample(model_fn, SAMPLERS[sampler], loss_fn, (X, Y) if data is None else data, **options)


def arrays(result) -> dict[str, np.ndarray]:
    out = {f"posterior/{k}": np.asarray(v) for k, v in result["posterior"].data_vars.items()}
    out.update({f"sample_stats/{k}": np.asarray(v) for k, v in result["sample_stats"].data_vars.items()})
    return out


def main(argv: list[str]) -> None:
    """One rank: ``MODE SAMPLERS DIR NUM_SAMPLES OUT [--chains C] [--bad seed|data]``; SAMPLERS comma-separated (one
    run each, DIR/<sampler> as its checkpoint unless DIR is "-"); rank 0 writes OUT-<sampler>.npz."""
    import argparse

    global X, Y, N
    parser = argparse.ArgumentParser()
    for name in ("mode", "samplers", "directory", "num_samples", "out"):
        parser.add_argument(name)
    parser.add_argument("--chains", type=int, default=3)
    parser.add_argument("--bad", default=None)  # what rank 1 gets wrong (the bad-input tests)
    parser.add_argument("--chain-method", default="sequential")
    parser.add_argument("--timeout", type=float, default=None)  # the job initializes its own group with it
    parser.add_argument("--shard", action="store_true")  # each rank passes only its rows (vr_mcmc.distributed.Shard)
    parser.add_argument("--own", action="store_true")  # process_group=False: each rank on its own
    parser.add_argument("--keep", type=int, default=None)  # keep_params=k (the parameter draws as an ensemble)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    extra = {"num_chains": args.chains, "chain_method": args.chain_method}
    if os.environ["RANK"] == "1" and args.bad == "seed":
        extra["seed"] = 4
    if os.environ["RANK"] == "1" and args.bad == "data":  # one example fewer (and num_data to match)
        X, Y, N = X[:-1], Y[:-1], N - 1
    if args.own:
        extra["process_group"] = False
    if args.keep is not None:
        extra["keep_params"] = args.keep
    if args.timeout is not None:  # the user's own group (vr_mcmc.sample uses it instead of making one)
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    if args.shard:
        from vr_mcmc.distributed import Shard, shard_range

        rows = shard_range(N, int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]) if args.bad != "shard" else 0)
        extra["data"] = Shard((X[rows.start : rows.stop].clone(), Y[rows.start : rows.stop].clone()), N, rows.start)
    for sampler in args.samplers.split(","):
        checkpoint = None if args.directory == "-" else os.path.join(args.directory, sampler)
        try:
            result = run(args.mode, sampler, checkpoint, int(args.num_samples), **extra)
        except Exception as exc:
            print(f"ERROR {type(exc).__name__} {exc}", flush=True)
            partial = getattr(exc, "partial", None)
            if partial is not None:
                print(f"PARTIAL draws {partial['posterior'].sizes['draw']}", flush=True)
            sys.exit(2)
        if result is not None:
            np.savez(f"{args.out}-{sampler}.npz", **arrays(result))
        print(f"rank {os.environ['RANK']} {sampler} done: {'result' if result is not None else 'None'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
