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
- different, keep = 0.1, lean=False: sampled Linear/Conv inputs, torch's own ReLU and pooling;
- same / different / projection at keep = 0.1.

``--detail`` lists each saved storage. Also prints the batch at which the exact model saves what
the randomized one saves at batch 150 (the "reduced batch" of the paper's comparison).

``--variance`` also measures, for each mode, the weight gradient's error E‖Ĝ − G‖² over
``--draws`` patterns against the documented formula (`vr_mcmc.rad.sampling`): a RandLinear of
the MLP's hidden shape (300 → 300, batch 150, float64) with fixed random input and output
gradient, and the activation estimate of a conv input (16 channels × 32×32 positions, 8 examples),
E‖â − a‖² = c·‖a‖². Printed: measured / predicted ± its standard error.

Usage: python benchmarks/rad_memory.py [--batch-size 150] [--keep 0.1] [--detail] [--variance --draws 2000]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import vr_mcmc.rad as rad
from vr_mcmc.models import mlp, rad_cnn
from vr_mcmc.rad.sampling import Spec, compress, expand

VARIANTS = [("same", False), ("same", True), ("different", False), ("different", True), ("projection", False)]


def ratio(sq_err: torch.Tensor, predicted: float) -> str:
    mean = float(sq_err.mean())
    se = float(sq_err.std()) / len(sq_err) ** 0.5
    return f"{mean / predicted:.4f} ± {se / predicted:.4f}"


def variance_table(keep: float, draws: int) -> None:
    torch.manual_seed(0)
    b, d, d_out = 150, 300, 300
    exact = nn.Linear(d, d_out).double()
    x = torch.randn(b, d, dtype=torch.float64).relu()
    g = torch.randn(b, d_out, dtype=torch.float64) / b
    exact(x).backward(g)
    grad = exact.weight.grad
    a = torch.randn(8, 16, 32 * 32, dtype=torch.float64)
    k_lin, k_conv = rad.num_kept(keep, d), rad.num_kept(keep, 32 * 32)
    print(f"\nvariance of the estimates, keep={keep:g}, {draws} draws: measured / formula ± standard error")
    print(f"{'mode':<26}{'Linear 300->300 dW':>22}{'formula':>30}{'conv input â':>20}")
    for mode, replacement in VARIANTS:
        layer = rad.randomize(copy.deepcopy(exact), keep, mode, replacement=replacement,
                              generator=torch.Generator().manual_seed(1))
        sq = []
        for _ in range(draws):
            layer.weight.grad = None
            layer(x).backward(g)
            sq.append(float((layer.weight.grad - grad).square().sum()))
        c = rad.variance_factor(d, k_lin, mode, replacement)
        if mode == "different":
            predicted, formula = c * float((g.square().sum(1) * x.square().sum(1)).sum()), "c·Σ‖dz_i‖²‖x_i‖²"
        else:
            predicted, formula = c * float(grad.square().sum()), "c·‖G‖²"
        spec = Spec(keep, mode, replacement)
        conv_sq = torch.stack([(expand(compress(a, spec, s), 32 * 32, spec, s) - a).square().sum()
                               for s in range(draws)])
        c_conv = rad.variance_factor(32 * 32, k_conv, mode, replacement)
        label = f"{mode}{', replacement' if replacement else ''}"
        c_name = "(D-1)/k" if replacement or mode == "projection" else "(D-k)/k"
        print(f"{label:<26}{ratio(torch.tensor(sq), predicted):>22}{formula + ', c=' + c_name:>30}"
              f"{ratio(conv_sq, c_conv * float(a.square().sum())):>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=150)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--detail", action="store_true", help="list every saved storage")
    parser.add_argument("--variance", action="store_true", help="also check the variance formulas")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch_size
    for name, make, shape in (("MLP 784-300-300-300-10", lambda: mlp((784, 300, 300, 300, 10)), (784,)),
                              ("CNN 3x32x32", rad_cnn, (3, 32, 32))):
        model = make()
        x = torch.randn(b, *shape)
        rows = [("exact", model)]
        rows.append(("lean exact (keep=1, same)", rad.randomize(copy.deepcopy(model), 1.0, "same")))
        rows.append((f"different, keep={args.keep:g}, lean=False",
                     rad.randomize(copy.deepcopy(model), args.keep, "different", lean=False)))
        for mode in rad.MODES:
            rows.append((f"{mode}, keep={args.keep:g}", rad.randomize(copy.deepcopy(model), args.keep, mode)))
        exact_bytes = rad.saved_activation_bytes(model, x)
        print(f"\n{name}, batch {b}: bytes autograd saves for one forward")
        print(f"{'model':<36}{'bytes':>12}{'per example':>14}{'ratio':>9}")
        for label, m in rows:
            nbytes = rad.saved_activation_bytes(m, x)
            print(f"{label:<36}{nbytes:>12,}{nbytes / b:>14,.0f}{nbytes / exact_bytes:>9.4f}")
            if args.detail:
                for e in rad.saved_tensors(m, x):
                    print(f"{'':<4}{e['bytes']:>10,}  {e['dtype']!s:<14}{e['shape']!s:<22}saved {e['count']}x")
        randomized_bytes = rad.saved_activation_bytes(rows[-1][1], x)
        reduced = max(1, round(b * randomized_bytes / exact_bytes))
        print(f"reduced batch of the exact model with the memory of keep={args.keep:g} at batch {b}: {reduced}")
    if args.variance:
        variance_table(args.keep, args.draws)


if __name__ == "__main__":
    main()
