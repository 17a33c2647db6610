"""Gradient tables: time of sum_rows + update for one batch against a plain forward+backward, and bytes.

For each configuration, one run, medians of interleaved repeats:

- plain:  forward + backward of the batch's mean cross-entropy;
- table:  ``table.sum_rows(idx)`` + ``table.update(idx, grads, sums)`` for the batch's per-example
          gradients (collected once beforehand; the engine's own cost is in per_example.py), with
          ``sums`` = B·.grad, which a SAGA step has from the ordinary backward.

Also prints each table's measured ``nbytes`` and, for the MLP at N = 60,000, the planner's
figures for the dense and auto tables (the dense one, 161 GB, is not allocated).

Usage: python benchmarks/storage.py [--batch-size 128] [--repeats 15] [--cnn-num-data 10000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vr_mcmc.models import cnn, mlp
from vr_mcmc.per_example import PerExampleGradients
from vr_mcmc.storage import GradientTable, plan


def measure(model, shape, num_data, configs, batch_size, repeats):
    torch.manual_seed(0)
    x = torch.randn(batch_size, *shape)
    y = torch.randint(0, 10, (batch_size,))
    engine = PerExampleGradients(model)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = engine.collect()
    engine.remove()
    sums = {n: p.grad * batch_size for n, p in model.named_parameters()}  # Σ_i g_i = B·.grad (mean loss)
    tables = {label: GradientTable(model, num_data, **cfg) for label, cfg in configs.items()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randperm(num_data, generator=gen)[:batch_size] for _ in range(repeats + 2)]

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def table_step(table, idx):
        table.sum_rows(idx)  # Σ_{i∈S} h_i, as SAGA needs it
        table.update(idx, grads, sums)

    times = {"plain": [], **{label: [] for label in tables}}
    for k, idx in enumerate(batches):
        t0 = time.perf_counter()
        plain()
        if k >= 2:  # the first two rounds warm up (and allocate the tables)
            times["plain"].append(time.perf_counter() - t0)
        for label, table in tables.items():
            t0 = time.perf_counter()
            table_step(table, idx)
            if k >= 2:
                times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, {label: t.nbytes for label, t in tables.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cnn-num-data", type=int, default=10_000,
                        help="rows of the CNN tables (a dense one holds N x 106k floats; 10,000 = 4.3 GB)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch_size}, "
          f"median of {args.repeats}")
    print(f"{'model / table':<34}{'N':>8}{'plain ms':>10}{'table ms':>10}{'x plain':>9}{'table GB':>11}")
    runs = [
        ("MLP 784-512-512-10", mlp((784, 512, 512, 10)), (784,), 60_000, {"factored": dict(policy="factored")}),
        ("CNN 3x32x32, 4 conv", cnn(), (3, 32, 32), args.cnn_num_data,
         {"dense": dict(policy="dense"), "rank-4": dict(policy="lowrank", rank=4)}),
    ]
    for name, model, shape, n, configs in runs:
        med, nbytes = measure(model, shape, n, configs, args.batch_size, args.repeats)
        for label in configs:
            print(f"{name + ', ' + label:<34}{n:>8,}{med['plain'] * 1e3:>10.2f}{med[label] * 1e3:>10.2f}"
                  f"{med[label] / med['plain']:>9.2f}{nbytes[label] / 1e9:>11.3f}", flush=True)

    net = mlp((784, 512, 512, 10))
    planned = plan(net, torch.randn(1, 784), 60_000)
    auto = GradientTable(net, 60_000, policy="auto")
    with PerExampleGradients(net) as engine:  # one batch allocates the table
        F.cross_entropy(net(torch.randn(4, 784)), torch.randint(0, 10, (4,))).backward()
        auto.update(torch.arange(4), engine.collect())
    print(f"\nMLP 784-512-512-10, N = 60,000: auto table nbytes (allocated, measured) {auto.nbytes / 1e9:.4f} GB; "
          f"dense table (planner, not allocated) {planned.total['naive'] / 1e9:.2f} GB; "
          f"ratio {auto.nbytes / planned.total['naive']:.4%}")


if __name__ == "__main__":
    main()
