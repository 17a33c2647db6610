"""Figure 1 of El Hanchi, "Time and Memory Efficient Variance Reduced Optimization and Sampling
for Deep Learning": SGD, SAGA, Nesterov SGD and Nesterov SAGA on softmax regression.

Set-up. scikit-learn's digits (1797 images of 8×8 pixels, 10 classes; bundled, no download),
a stratified 75/25 train/test split (1347/450 examples, ``random_state=seed``), features
standardized with the training set's mean and standard deviation. The model is multinomial
logistic regression, ``nn.Linear(64, 10)`` started at zero, in float64 so that SAGA's descent is
not hidden by float32 rounding. All four optimizers are `torch_sample` samplers at
``temperature=0``:

- SGD: ``SGLD(..., temperature=0)``;
- SAGA: ``SAGALD(..., temperature=0)``, its table of per-example gradients filled by one pass
  (``initialize``, at the starting point) before the first step;
- Nesterov SGD / Nesterov SAGA: the same with ``momentum=0.9, nesterov=True``.

They start from the same point, see the same sequence of minibatches (one seeded
`UniformIndexSampler`) and use the same step size. L2 regularization is a Gaussian prior,
``priors.Normal(std)`` with 1/std² = N·λ, so the objective every optimizer minimizes is

    F(θ) = (1/N) Σ_i CE(x_i, y_i; θ) + (λ/2)·‖θ‖²       (weights and biases; default λ = 0.01).

"train loss" is F(θ) on the whole training set, cross-entropy *including* the L2 term; "test
loss" is the plain mean cross-entropy on the test set. The minimum F* of the strongly convex F
is found by full-batch L-BFGS, and the first panel shows F(θ) − F* on a log scale.

Step size. The samplers' gradient is that of the SUM loss, N·F, so ``--lr`` is in sum units; the
usual step on the mean loss is lr·N. Final F − F* after 50 epochs (batch 16, seed 0):

    lr (mean-loss step)   SGD      SAGA     Nesterov SGD  Nesterov SAGA
    5e-6  (0.007)         1.7e-2   1.8e-2   1.6e-4        3.3e-6
    1e-5  (0.013)         3.7e-3   3.9e-3   9.6e-4        7.9e-5
    2e-5  (0.027)         4.6e-4   4.5e-4   5.5e-3        1.2e-3
    4e-5  (0.054)         3.0e-4   1.6e-5   2.3e-2        3.6e-2
    6e-5  (0.081)         7.4e-4   8.4e-7   9.1e-2        1.1e-1
    1e-4  (0.135)         2.5e-3   2.8e-7   2.6e-1        5.4e-1

Up to 2e-5 plain SGD and SAGA are still in their common transient (the ill-conditioned
directions of correlated pixels) and SAGA is not below SGD. From 4e-5 SGD sits at the floor set
by its gradient noise, which rises with the step, while SAGA keeps converging linearly. The
default, 4e-5, is the smallest step with that picture: SAGA ends 10-30× below SGD for seeds 0-4
(1.4-1.6e-5 against 1.6-4.4e-4). At one and the same step momentum 0.9 multiplies the effective
step by 10, so the Nesterov variants are at their noise floor here (and SAGA's variance
reduction no longer holds at that effective step: Nesterov SAGA is not better than Nesterov SGD);
at small steps (``--lr 5e-6``) they are the fastest, Nesterov SAGA 50× below Nesterov SGD.

The script exits with status 1 unless SAGA's final training loss is below SGD's.

Run: ``python examples/seed_figure1.py [--epochs 50 --lr 4e-5 --batch-size 16 --seed 0 --out seed_figure1.png]``
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import torch_sample
from vr_mcmc.data import UniformIndexSampler
from vr_mcmc.per_example import PerExampleGradients

METHODS = ("SGD", "SAGA", "Nesterov SGD", "Nesterov SAGA")
COLORS = {"SGD": "tab:blue", "SAGA": "tab:red", "Nesterov SGD": "tab:cyan", "Nesterov SAGA": "tab:orange"}
STYLES = {"SGD": "--", "SAGA": "-", "Nesterov SGD": "--", "Nesterov SAGA": "-"}

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_data(seed: int, dtype: torch.dtype = torch.float32, images: bool = False) -> Data:
    """Digits split 75/25 (stratified), standardized with the training statistics.

    ``images=True`` gives [n, 1, 8, 8] tensors (for a CNN) instead of [n, 64] feature vectors.
    """
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean = x_tr.mean(axis=0)
    # Border pixels are always 0 in the training set: keep them at 0 instead of dividing by 0.
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    shape = (-1, 1, 8, 8) if images else (-1, 64)
    return (torch.tensor(x_tr, dtype=dtype).reshape(shape), torch.tensor(y_tr, dtype=torch.long),
            torch.tensor(x_te, dtype=dtype).reshape(shape), torch.tensor(y_te, dtype=torch.long))


def batches(x: torch.Tensor, y: torch.Tensor, index_sampler: UniformIndexSampler) -> Iterator[tuple]:
    """(idx, x[idx], y[idx]) per minibatch: what the SAGA table needs, without a DataLoader's per-item cost."""
    for batch in index_sampler:
        idx = torch.tensor(batch, dtype=torch.long)
        yield idx, x[idx], y[idx]


def l2_prior(weight_decay: float, num_data: int) -> torch_sample.priors.Normal | None:
    """The prior whose −log density on the sum scale is N·(λ/2)·‖θ‖², i.e. λ on the mean scale."""
    return torch_sample.priors.Normal((1.0 / (num_data * weight_decay)) ** 0.5) if weight_decay > 0 else None


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float = 0.0,
             chunk: int = 512) -> tuple[float, float]:
    """(mean cross-entropy + (λ/2)‖θ‖², accuracy) on the whole set."""
    model.eval()
    total, correct = 0.0, 0
    for s in range(0, len(x), chunk):
        logits = model(x[s : s + chunk])
        total += float(F.cross_entropy(logits, y[s : s + chunk], reduction="sum"))
        correct += int((logits.argmax(1) == y[s : s + chunk]).sum())
    model.train()
    penalty = 0.5 * weight_decay * sum(float((p.double() ** 2).sum()) for p in model.parameters())
    return total / len(x) + penalty, correct / len(x)


def make_optimizer(method: str, model: nn.Module, lr: float, num_data: int, prior: torch_sample.priors.Prior | None,
                   policy: str = "auto") -> torch.optim.Optimizer:
    """One of METHODS as a torch_sample sampler at temperature 0 (an optimizer)."""
    nesterov = method.startswith("Nesterov")
    momentum = dict(momentum=0.9, nesterov=True) if nesterov else {}
    if method.endswith("SAGA"):
        # The engine hooks the model's layers, so it must exist before the first training forward.
        engine = PerExampleGradients(model)
        return torch_sample.SAGALD(model.parameters(), lr, num_data, engine, policy=policy, prior=prior,
                                   temperature=0.0, **momentum)
    return torch_sample.SGLD(model.parameters(), lr, num_data, prior=prior, temperature=0.0, **momentum)


# Per-epoch "train_loss", "test_loss", "train_acc", "test_acc"; SAGA runs add "table_mb": [table size].
History = dict[str, list[float]]


def train(method: str, init_model: nn.Module, data: Data, *, lr: float, epochs: int, batch_size: int, seed: int,
          weight_decay: float, policy: str = "auto") -> History:
    """Run one optimizer from a copy of ``init_model``; the metrics after every epoch (epoch 0: the start)."""
    x_tr, y_tr, x_te, y_te = data
    n = len(x_tr)
    model = copy.deepcopy(init_model)
    opt = make_optimizer(method, model, lr, n, l2_prior(weight_decay, n), policy)
    # The same seed for every method: all four see the same minibatches in the same order.
    index_sampler = UniformIndexSampler(n, batch_size, seed=seed)

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xb), yb)

    hist: History = {k: [] for k in ("train_loss", "test_loss", "train_acc", "test_acc")}
    if isinstance(opt, torch_sample.SAGALD):
        # A separate sampler so that the training batches stay identical to the other methods'.
        opt.initialize(batches(x_tr, y_tr, UniformIndexSampler(n, batch_size, seed=seed + 1)), loss_fn)
        hist["table_mb"] = [opt.table.nbytes / 2**20]

    def record() -> None:
        tr_loss, tr_acc = evaluate(model, x_tr, y_tr, weight_decay)
        te_loss, te_acc = evaluate(model, x_te, y_te)
        for k, v in zip(("train_loss", "test_loss", "train_acc", "test_acc"), (tr_loss, te_loss, tr_acc, te_acc)):
            hist[k].append(v)

    record()
    for _ in range(epochs):
        for idx, xb, yb in batches(x_tr, y_tr, index_sampler):
            opt.zero_grad()
            loss_fn(xb, yb).backward()
            opt.step(indices=idx)
        record()
        if not math.isfinite(hist["train_loss"][-1]):
            print(f"{method}: training loss is not finite; step size too large", file=sys.stderr)
            break
    return hist


def full_batch_minimum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> float:
    """min F by L-BFGS on the whole training set (F is strongly convex for softmax regression with λ > 0)."""
    model = copy.deepcopy(model)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        penalty = 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss = F.cross_entropy(model(x), y) + penalty
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return evaluate(model, x, y, weight_decay)[0]


def plot(histories: dict[str, History], path: str, title: str, optimum: float | None = None,
         zoom_after_start: bool = True) -> None:
    """Four panels against epochs: training loss (log), test loss, training accuracy, test accuracy.

    With ``optimum`` the first panel shows the training loss minus it: the losses differ by far less
    than the minimum itself, so on the raw loss the four curves would lie on top of each other.
    ``zoom_after_start``: scale the linear panels to the epochs after 0 (a start at chance level
    would squash the curves).
    """
    first = "training loss (CE + L2)" + (" − minimum" if optimum is not None else "")
    panels = (("train_loss", first), ("test_loss", "test loss (CE)"), ("train_acc", "training accuracy"),
              ("test_acc", "test accuracy"))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label) in zip(axes, panels):
        for method, hist in histories.items():
            values = hist[key]
            if key == "train_loss" and optimum is not None:
                # L-BFGS's minimum is itself rounded: keep the differences positive for the log axis.
                values = [max(v - optimum, 1e-15) for v in values]
            ax.plot(range(len(values)), values, STYLES[method], color=COLORS[method], label=method, lw=1.6)
        if key != "train_loss" and len(next(iter(histories.values()))[key]) > 2:
            later = [v for h in histories.values() for v in h[key][int(zoom_after_start):] if math.isfinite(v)]
            lo, hi = min(later), max(later)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(histories: dict[str, History], optimum: float | None = None) -> None:
    """The final epoch's figures, one row per method."""
    head = f"{'method':<15}{'train loss':>14}{'test loss':>12}{'train acc':>11}{'test acc':>10}"
    if optimum is not None:
        head += f"{'train loss − min':>18}"
    print(head)
    for method, h in histories.items():
        row = (f"{method:<15}{h['train_loss'][-1]:>14.6f}{h['test_loss'][-1]:>12.4f}"
               f"{h['train_acc'][-1]:>11.4f}{h['test_acc'][-1]:>10.4f}")
        if optimum is not None:
            row += f"{h['train_loss'][-1] - optimum:>18.2e}"
        print(row)


def parse_args(argv: list[str] | None, doc: str, warmup: bool = False,
               **defaults: float | int | str) -> argparse.Namespace:
    """The flags both figure scripts share, with per-script defaults (``warmup``: figure 2's Adam warm-up flags);
    the help text opens with the first paragraph of the script's ``doc``."""
    p = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    p.add_argument("--epochs", type=int, default=defaults["epochs"])
    p.add_argument("--lr", type=float, default=defaults["lr"],
                   help="step size on the SUM loss (≈ mean-loss learning rate / N), the same for all four")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"],
                   help="λ of the L2 term (λ/2)‖θ‖² on the mean loss, given to the samplers as a Normal prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=defaults["out"], help="where to save the PNG")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the models are small, and on a small or shared CPU a second "
                        "thread's waiting costs more than it gives)")
    if warmup:
        p.add_argument("--warmup-epochs", type=int, default=10, help="epochs of Adam before the comparison")
        p.add_argument("--warmup-lr", type=float, default=1e-3, help="Adam's learning rate (on the mean loss)")
    return p.parse_args(argv)


def run_all(init_model: nn.Module, data: Data, args: argparse.Namespace, policy: str = "auto") -> dict[str, History]:
    """The four methods from the same ``init_model`` with the flags' settings, timing each."""
    histories = {}
    for method in METHODS:
        t0 = time.perf_counter()
        histories[method] = train(method, init_model, data, lr=args.lr, epochs=args.epochs,
                                  batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay,
                                  policy=policy)
        table = histories[method].get("table_mb")
        extra = f" (gradient table {table[0]:.1f} MB)" if table else ""
        print(f"  {method:<14} {time.perf_counter() - t0:6.1f} s{extra}")
    return histories


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__, epochs=50, lr=4e-5, batch_size=16, weight_decay=1e-2,
                      out="seed_figure1.png")
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_data(args.seed, torch.float64)
    n = len(data[0])
    init_model = nn.Linear(64, 10).double()
    # Zero start: the loss is convex, and a random start would add a component along the softmax's
    # shift direction (the same vector added to every class) that only the L2 term shrinks, at the
    # same slow rate for all four methods, which hides the differences between them.
    nn.init.zeros_(init_model.weight)
    nn.init.zeros_(init_model.bias)
    print(f"digits: {n} train / {len(data[2])} test; softmax regression; lr = {args.lr:g} (sum loss) = "
          f"{args.lr * n:.4g} (mean loss); batch {args.batch_size}; λ = {args.weight_decay:g}; {args.epochs} epochs")
    histories = run_all(init_model, data, args)
    optimum = full_batch_minimum(init_model, data[0], data[1], args.weight_decay) if args.weight_decay > 0 else None
    plot(histories, args.out, f"Softmax regression on digits (N = {n}, batch {args.batch_size}, "
                              f"mean-loss step {args.lr * n:.3g}, λ = {args.weight_decay:g})", optimum)
    print()
    print_table(histories, optimum)
    if optimum is not None:
        print(f"minimum of the training loss (L-BFGS): {optimum:.6f}")
    print(f"saved {args.out}; {time.perf_counter() - t0:.1f} s in all")
    sgd, saga = histories["SGD"]["train_loss"][-1], histories["SAGA"]["train_loss"][-1]
    if not saga < sgd:
        print(f"FAIL: SAGA's final training loss {saga:.6f} is not below SGD's {sgd:.6f}", file=sys.stderr)
        sys.exit(1)
    print(f"OK: SAGA's final training loss {saga:.6f} < SGD's {sgd:.6f}")


if __name__ == "__main__":
    main()
