"""A Bayesian CNN on digits, end to end: BatchNorm replaced, sampled by SAGA-LD and cSGHMC, kept as a posterior
ensemble, evaluated (accuracy, log-likelihood, ECE, Brier) and drawn as a reliability diagram.

The data are scikit-learn's 8×8 digits (bundled, no download): 1,347 training and 450 test images, pixels / 16.
The network: conv 3×3 (16) → norm → ReLU → conv 3×3 (32) → norm → ReLU → max-pool 2 → linear (512 → 10), 10,026
parameters, written with BatchNorm as one would write it and made per-example-exact by
`vr_mcmc.per_example.replace_batchnorm` (GroupNorm over the same channels, affine parameters kept). The posterior:
a N(0, 1) prior on every weight and the softmax likelihood of the 1,347 examples, at temperature 1.

Two samplers through `vr_mcmc.sample`, each 2 chains with ``keep_params`` so the draws' parameters are saved:

- SAGA-LD (variance-reduced Langevin dynamics, a per-example gradient table), batch 64, fixed step;
- cSGHMC (SGHMC with a cyclical cosine step size, Zhang et al. 2020): each cycle explores for its first half at
  temperature 0 (no draws kept) and samples in the second.

Each ensemble is then evaluated on the test set by `vr_mcmc.PosteriorEnsemble` (accuracy, test log-likelihood,
ECE, Brier) next to the single network that SGD with momentum finds from the same start (the MAP estimate), with a
reliability diagram of all three. Each draw's test accuracy is also recorded, so `az.summary` gives its R-hat and ESS.

Run: ``python examples/cnn_digits.py`` (a few minutes on a laptop CPU; ``--quick`` for a smoke run of seconds).
Writes ``OUT/saga_ld``, ``OUT/csghmc`` (checkpoint directories with the draws and the saved parameters: rerunning
resumes / reuses them), ``OUT/reliability.png`` and prints a table. ``--out`` defaults to ``./cnn_digits_out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import arviz as az
import torch
import torch.nn.functional as F
from torch import nn

import torch_sample
import vr_mcmc
from torch_sample import priors
from torch_sample.schedules import Cyclical
from vr_mcmc.ensemble import brier_score, calibration_bins, expected_calibration_error
from vr_mcmc.per_example import PerExampleGradients, replace_batchnorm

PRIOR = priors.Normal(1.0)


def load_data(test_size: int = 450, seed: int = 0):
    """Digits as (N, 1, 8, 8) float32 images in [0, 1] and labels: a stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)

    def images(a):
        return torch.as_tensor(a / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)

    return images(x_train), torch.as_tensor(y_train), images(x_test), torch.as_tensor(y_test)


def make_cnn() -> nn.Module:
    """The CNN as written with BatchNorm, then with every BatchNorm replaced by a GroupNorm of the same channels."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    return replace_batchnorm(model, num_groups=4)


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)  # the batch mean NLL: the samplers scale it by N


def map_estimate(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    """SGD with momentum on the same posterior (prior included), from the same initialization as chain 0."""
    torch.manual_seed(seed)
    model = make_cnn()
    opt = torch_sample.SGLD(model.parameters(), lr=2e-5, num_data=len(x), prior=PRIOR, temperature=0.0, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model, (x[idx], y[idx])).backward()
        opt.step()
    return model.eval()


def run_sampler(name: str, out: Path, data: tuple, test: tuple, args: argparse.Namespace):
    x, y = data
    xt, yt = test
    n = len(x)
    steps = args.warmup + args.samples

    def sampler_fn(model: nn.Module):
        if name == "saga_ld":
            return torch_sample.SAGALD(model.parameters(), lr=args.saga_lr, num_data=n,
                                       engine=PerExampleGradients(model), prior=PRIOR, temperature=args.temperature)
        return torch_sample.SGHMC(model.parameters(), lr=args.sghmc_lr, num_data=n, friction=args.friction,
                                  prior=PRIOR, temperature=args.temperature,
                                  schedule=Cyclical(args.cycles, steps, exploration=0.5))

    t0 = time.perf_counter()
    idata = vr_mcmc.sample(make_cnn, sampler_fn, loss_fn, (x, y), batch_size=64, num_warmup=args.warmup,
                           num_samples=args.samples, num_chains=args.chains, thin=args.thin,
                           keep_params=args.keep_every, checkpoint=out / name, seed=args.seed,
                           record={"test_accuracy": lambda m: (m(xt).argmax(-1) == yt).double().mean()},
                           progress=not args.quiet)
    return idata, time.perf_counter() - t0


def plot_reliability(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated")
    for label, bins in curves.items():
        full = bins["count"] > 0  # empty bins have no accuracy
        ax.plot(bins["confidence"][full], bins["accuracy"][full], "o-", ms=4, label=label)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("digits CNN, test set")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("cnn_digits_out"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, 2 kept draws per chain")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--thin", type=int, default=20)
    parser.add_argument("--keep-every", type=int, default=2, help="keep every k-th draw's parameters")
    parser.add_argument("--saga-lr", type=float, default=5e-5)
    parser.add_argument("--sghmc-lr", type=float, default=5e-3)
    parser.add_argument("--friction", type=float, default=20.0)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0, help="T of the posterior p(θ|D)^(1/T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.samples, args.thin, args.keep_every, args.cycles = 20, 40, 10, 1, 2
    torch.set_num_threads(1)  # a 10,026-parameter model: one thread is fastest (see vr_mcmc.sample's num_threads)
    x, y, xt, yt = load_data()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, curves = [], {}
    t0 = time.perf_counter()
    sgd = map_estimate(x, y, steps=args.warmup + args.samples, seed=args.seed)
    with torch.no_grad():
        probs = torch.softmax(sgd(xt), -1)
    rows.append(("SGD (MAP)", 1, scores_of(probs, yt), time.perf_counter() - t0))
    curves["SGD (MAP)"] = calibration_bins(probs, yt)
    for name, label in (("saga_ld", "SAGA-LD"), ("csghmc", "cSGHMC")):
        idata, seconds = run_sampler(name, args.out, (x, y), (xt, yt), args)
        print(az.summary(idata, var_names=["test_accuracy"], kind="diagnostics"))
        ensemble = vr_mcmc.PosteriorEnsemble(args.out / name, make_cnn())
        scores = ensemble.evaluate((xt, yt))
        rows.append((label, len(ensemble), scores, seconds))
        curves[f"{label} ({len(ensemble)} draws)"] = calibration_bins(ensemble.predict(xt), yt)
    plot_reliability(curves, args.out / "reliability.png")

    print(f"\n{'':12s} {'draws':>6s} {'accuracy':>9s} {'test LL':>8s} {'ECE':>7s} {'Brier':>7s} {'seconds':>8s}")
    for label, draws, s, seconds in rows:
        print(f"{label:12s} {draws:6d} {s['accuracy']:9.4f} {s['log_likelihood']:8.4f} {s['ece']:7.4f} "
              f"{s['brier']:7.4f} {seconds:8.1f}")
    print(f"reliability diagram: {args.out / 'reliability.png'}")
    return rows


def scores_of(probs: torch.Tensor, y: torch.Tensor) -> dict:
    """One network's scores, with the functions PosteriorEnsemble.evaluate uses for an ensemble's mean probabilities."""
    return {"accuracy": float((probs.argmax(-1) == y).double().mean()),
            "log_likelihood": float(probs[torch.arange(len(y)), y].double().log().mean()),
            "ece": expected_calibration_error(probs, y), "brier": brier_score(probs, y)}


if __name__ == "__main__":
    main()
