"""The feedforward experiment of Oktay et al., "Randomized Automatic Differentiation" (ICLR 2021), small.

Set-up. scikit-learn's digits (1797 images of 8×8 pixels, 10 classes; bundled, no download), a
stratified 75/25 train/test split (1347/450, ``random_state=0``), features standardized with the
training set's statistics. The model is the paper's MLP on these 64 inputs: 64-300-300-300-10
with ReLU, float32, PyTorch's default initialization (seeded). It is trained by SGD, the
`torch_sample.SGLD` sampler at ``temperature=0``, for ``--iterations`` steps:

- baseline: the exact model, batch 150;
- reduced batch: the exact model with the batch at which it saves for backward what the
  randomized models save at batch 150 (measured with `vr_mcmc.rad.saved_activation_bytes`:
  0.130× the exact bytes, batch 19);
- same sample / different sample / projection: ``vr_mcmc.rad.randomize(model, keep=0.1, mode)``
  at batch 150 (which also swaps ReLU for the 1-bit `LeanReLU`).

Every variant of one seed starts from the same weights; batches are drawn uniformly without
replacement within each epoch, from a generator seeded per seed (the reduced batch draws its own
smaller batches). Every ``--eval-every`` iterations the script records the mean cross-entropy on
the whole training set and the test accuracy. The paper's expectation: baseline best, the
randomized variants between, the reduced batch worst at equal iterations.

Step size. The variants tolerate different steps (same sample and projection diverge where the
others do not), so each runs every step size of the ``--lr`` grid (default 1e-4, 2e-4, 4e-4) and
is shown at the one with the lowest final training loss (mean over seeds; a step at which any
seed diverges is out). ``--lr`` is the sampler's step size, which applies to the SUM
of the per-example losses: the step on the mean loss is lr × N (N = 1347), here 0.135-0.539.

Writes a PNG (training loss on a log scale and test accuracy against iterations, mean ± sd over
seeds) and prints the final training loss of every variant and step, then each variant at its
best step at a few iterations (mean ± sd over seeds). Default run: 80 s on one CPU thread.

Run: ``python examples/rad_figure.py [--iterations 400 --seeds 3 --lr 1e-4 2e-4 4e-4 --keep 0.1 --out rad_figure.png]``
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import torch_sample
import vr_mcmc.rad as rad

VARIANTS = ("baseline", "reduced batch", "same sample", "different sample", "projection")
MODE = {"same sample": "same", "different sample": "different", "projection": "projection"}


def load_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data, digits.target, test_size=0.25, stratify=digits.target,
                                              random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0
    to = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return to(x_tr), torch.tensor(y_tr), to(x_te), torch.tensor(y_te)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 300),
                         nn.ReLU(), nn.Linear(300, 10))


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Uniform batches without replacement within each epoch, forever."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s : s + batch_size]


@torch.no_grad()
def evaluate(model, x_tr, y_tr, x_te, y_te) -> tuple[float, float]:
    loss = float(F.cross_entropy(model(x_tr), y_tr))
    acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return loss, acc


def run(variant, init, batch_size, data, args, seed, lr) -> tuple[list[float], list[float]]:
    x_tr, y_tr, x_te, y_te = data
    model = copy.deepcopy(init)
    if variant in MODE:
        rad.randomize(model, args.keep, MODE[variant], generator=torch.Generator().manual_seed(1000 + seed))
    sampler = torch_sample.SGLD(model.parameters(), lr=lr, num_data=len(x_tr), temperature=0.0)
    stream = batches(len(x_tr), batch_size, torch.Generator().manual_seed(seed))
    losses, accs = [], []
    for it in range(args.iterations + 1):
        if it % args.eval_every == 0:
            loss, acc = evaluate(model, x_tr, y_tr, x_te, y_te)
            losses.append(loss)
            accs.append(acc)
        if it == args.iterations:
            break
        idx = next(stream)
        sampler.zero_grad()
        F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        sampler.step(indices=idx)
    return losses, accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..seeds-1")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 2e-4, 4e-4],
                        help="step sizes on the SUM loss (mean-loss step = lr·N); each variant uses its best")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--report-at", type=int, nargs="+", default=[100, 200],
                        help="iterations reported in the table besides the last (multiples of --eval-every)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="rad_figure.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data()
    n = len(data[0])

    # The reduced batch: the exact model's batch with the randomized model's saved bytes at batch 150.
    probe = make_mlp()
    x = data[0][: args.batch_size].clone()  # a batch of its own, as x[idx] is in training (a view would count all of x)
    exact_bytes = rad.saved_activation_bytes(probe, x)
    randomized_bytes = rad.saved_activation_bytes(rad.randomize(copy.deepcopy(probe), args.keep, "different"), x)
    reduced = max(1, round(args.batch_size * randomized_bytes / exact_bytes))
    print(f"saved for backward at batch {args.batch_size}: exact {exact_bytes:,} B, randomized (keep={args.keep:g}) "
          f"{randomized_bytes:,} B ({randomized_bytes / exact_bytes:.3f}x) -> reduced batch {reduced}")
    print(f"N = {n}, {args.iterations} iterations, {args.seeds} seeds, lr grid {args.lr} "
          f"(mean-loss steps {[round(lr * n, 3) for lr in args.lr]})")

    # results[variant][lr] = (loss curves, accuracy curves), one per seed
    results = {v: {lr: ([], []) for lr in args.lr} for v in VARIANTS}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = make_mlp()
        for v in VARIANTS:
            for lr in args.lr:
                losses, accs = run(v, init, reduced if v == "reduced batch" else args.batch_size, data, args, seed, lr)
                results[v][lr][0].append(losses)
                results[v][lr][1].append(accs)

    def final_loss(v: str, lr: float) -> float:
        value = float(np.mean([c[-1] for c in results[v][lr][0]]))
        return value if math.isfinite(value) else math.inf  # a diverged seed rules the step out

    print("\nfinal training loss per step size (mean over seeds; inf: a seed diverged)")
    print(f"{'variant':<22}" + "".join(f"{f'lr={lr:g}':>14}" for lr in args.lr))
    best = {}
    for v in VARIANTS:
        print(f"{v:<22}" + "".join(f"{final_loss(v, lr):>14.4g}" for lr in args.lr))
        best[v] = min(args.lr, key=lambda lr, v=v: final_loss(v, lr))

    steps = np.arange(0, args.iterations + 1, args.eval_every)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        for ax, curves in zip(axes, results[v][best[v]]):
            a = np.array(curves)
            m, s = a.mean(0), a.std(0)
            label = v if v != "reduced batch" else f"reduced batch ({reduced})"
            ax.plot(steps, m, label=f"{label}, lr={best[v]:g}")
            ax.fill_between(steps, m - s, m + s, alpha=0.2)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss (mean cross-entropy)")
    axes[1].set_ylabel("test accuracy")
    axes[1].set_ylim(0.8, 1.0)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"RAD on digits: MLP 64-300-300-300-10, batch {args.batch_size}, keep={args.keep:g}, "
                 f"each variant at its best step, {args.seeds} seeds (mean ± sd)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)

    def fmt(values: list[float], digits: int) -> str:
        a = np.array(values)  # a diverged run (nan/inf) shows as nan rather than stopping the table
        sd = a.std(ddof=1) if len(a) > 1 else 0.0
        return f"{a.mean():.{digits}f} ± {sd:.{digits}f}"

    at = sorted({i for i in args.report_at if 0 < i < args.iterations and i % args.eval_every == 0}
                | {args.iterations})
    print(f"\neach variant at its best step (mean ± sd over {args.seeds} seeds)")
    print(f"{'variant':<22}{'batch':>6}{'lr':>8}  " + "".join(f"{f'loss @{i}':<20}" for i in at)
          + f"{f'test acc @{at[-1]}':<18}")
    for v in VARIANTS:
        losses, accs = results[v][best[v]]
        b = reduced if v == "reduced batch" else args.batch_size
        cells = "".join(f"{fmt([c[i // args.eval_every] for c in losses], 4):<20}" for i in at)
        print(f"{v:<22}{b:>6}{best[v]:>8g}  {cells}{fmt([c[-1] for c in accs], 4):<18}")
    print(f"\nwrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
