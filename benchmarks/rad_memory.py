"""Randomized autodiff: bytes autograd saves for one forward, exact model against randomized (keep = 0.1).

Models (the shapes of the RAD paper's experiments, Oktay et al. 2021):

- MLP 784-300-300-300-10 with ReLU, batch 150 (MNIST-sized input);
- CNN on 3×32×32 (CIFAR-sized input), batch 150: conv 5×5 (3→16, pad 2), ReLU, max-pool 2;
  conv 5×5 (16→32, pad 2), ReLU, max-pool 2; conv 5×5 (32→32, pad 2), ReLU, avg-pool 2;
  flatten (512), linear 512→10. The paper's own CNN is not reproduced exactly: this one has
  its kind of layers (conv + ReLU + pooling + a linear head) and both kinds of pooling.

Bytes are measured by `vr_mcmc.rad.saved_activation_bytes`: every tensor autograd saves during
the forward, through ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once and
whole, parameters excluded, the input included when a layer saves it. Rows:

- exact: the torch model;
- lean exact: ``randomize(keep=1.0, mode="same")``, i.e. every activation kept (exact gradients)
  but ReLU and pooling swapped for `LeanReLU` / `LeanMaxPool2d` / `LeanAvgPool2d`;
- same / different / projection at keep = 0.1.

``--detail`` lists each saved storage. Also prints the batch at which the exact model saves what
the randomized one saves at batch 150 (the "reduced batch" of the paper's comparison).

Usage: python benchmarks/rad_memory.py [--batch-size 150] [--keep 0.1] [--detail]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import vr_mcmc.rad as rad


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 300),
                         nn.ReLU(), nn.Linear(300, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(512, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=150)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--detail", action="store_true", help="list every saved storage")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch_size
    for name, make, shape in (("MLP 784-300-300-300-10", mlp, (784,)), ("CNN 3x32x32", cnn, (3, 32, 32))):
        model = make()
        x = torch.randn(b, *shape)
        rows = [("exact", model)]
        rows.append(("lean exact (keep=1, same)", rad.randomize(copy.deepcopy(model), 1.0, "same")))
        for mode in rad.MODES:
            rows.append((f"{mode}, keep={args.keep:g}", rad.randomize(copy.deepcopy(model), args.keep, mode)))
        exact_bytes = rad.saved_activation_bytes(model, x)
        print(f"\n{name}, batch {b}: bytes autograd saves for one forward")
        print(f"{'model':<28}{'bytes':>12}{'per example':>14}{'ratio':>9}")
        for label, m in rows:
            nbytes = rad.saved_activation_bytes(m, x)
            print(f"{label:<28}{nbytes:>12,}{nbytes / b:>14,.0f}{nbytes / exact_bytes:>9.4f}")
            if args.detail:
                for e in rad.saved_tensors(m, x):
                    print(f"{'':<4}{e['bytes']:>10,}  {e['dtype']!s:<14}{e['shape']!s:<22}saved {e['count']}x")
        randomized_bytes = rad.saved_activation_bytes(rows[-1][1], x)
        reduced = max(1, round(b * randomized_bytes / exact_bytes))
        print(f"reduced batch of the exact model with the memory of keep={args.keep:g} at batch {b}: {reduced}")


if __name__ == "__main__":
    main()
