"""The `vr-mcmc demo` experiment: a Bayesian MLP on scikit-learn's digits, sampled with SGLD, SAGA-LD and SVRG-LD.

Set-up. scikit-learn's digits (1797 images of 8×8 pixels, 10 classes; bundled with scikit-learn, no
download), a stratified 75/25 train/test split (1347/450 examples, ``random_state=0``), features
standardized with the training set's mean and standard deviation. The model is an MLP 64-32-10 with
tanh (2,410 parameters), likelihood softmax cross-entropy, prior N(0, 0.5²) on every weight and bias,
temperature 1: the posterior π(θ) ∝ p(θ)·Π_i p(y_i | x_i, θ) of DESIGN.md §2.

Each method runs ``--chains`` chains through `vr_mcmc.sample` from the same per-chain initializations,
with the same minibatches (64 uniform indices, without replacement within an epoch; 22 steps an epoch)
and the same step size h = 6e-4 (in units of the summed loss; 0.81 as an SGD step on the mean loss):
30 epochs of warmup, then ``--samples`` draws per chain, one every 80 steps (3.6 epochs). SAGA-LD keeps
an exact table of per-example gradients (rows start at zero); SVRG-LD takes a full-gradient snapshot
every epoch (the engine under SAGA-LD runs without its consistency check, ``check=False``, which
would cost 30% of the step here). Step size: at 3e-4 the chains mix too slowly for this budget (bulk ESS of the test
log-likelihood 36 of 600 draws in a trial), at 8e-4 a few draws (1%) make excursions to a test accuracy
below 0.87 and the mean log density drops (discretization bias); 6e-4 is between.

What is recorded per draw: on the 450 test examples, the predictive class probabilities ``probs``
[450, 10], the accuracy ``accuracy`` and the mean log-likelihood ``test_loglik`` of that single draw,
and the pointwise log-likelihood (``log_likelihood`` group, for ``az.loo``); the sampler's statistics
plus ``data_passes``, the running count of per-example gradients over N.

Printed: the ArviZ summary of the predictive quantities per method, and a table comparing the methods:
accuracy and mean log-likelihood of the posterior predictive (the class probabilities averaged over all
draws of all chains, then scored), the largest R-hat and the smallest bulk ESS over the recorded scalars
and the pointwise test log-likelihood, wall time, and data passes per chain. Written to ``--out``: one
netCDF file per method (``az.from_netcdf``; ``vr-mcmc summary FILE``), trace and rank plots per method,
the test accuracy and log-likelihood of each draw and of the running posterior predictive against data
passes for the three methods, and the printed report as ``report.txt``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import torch_sample
from torch_sample import priors

from .models import mlp
from .per_example import PerExampleGradients

__all__ = ["METHODS", "Config", "load_digits_split", "main", "run", "write_netcdf"]

METHODS = ("SGLD", "SAGA-LD", "SVRG-LD")
FILE_NAMES = {"SGLD": "sgld", "SAGA-LD": "saga-ld", "SVRG-LD": "svrg-ld"}
COLORS = {"SGLD": "tab:blue", "SAGA-LD": "tab:red", "SVRG-LD": "tab:green"}


@dataclass(frozen=True)
class Config:
    """Sizes of one demo run (the defaults are the full run; `QUICK` is the test-sized one)."""

    hidden: int = 32
    prior_std: float = 0.5
    batch_size: int = 64
    lr: float = 6e-4
    warmup_epochs: int = 30
    num_samples: int = 150
    thin: int = 80
    num_chains: int = 4
    test_size: int = 450


QUICK = Config(hidden=16, warmup_epochs=2, num_samples=12, thin=4, num_chains=2)


# -- data and model -------------------------------------------------------------------------------


def load_digits_split(test_size: int = 450, seed: int = 0, device: Any = "cpu"):
    """scikit-learn's digits: (X_train, y_train, X_test, y_test) as float32/long tensors on ``device``,
    a stratified split, features standardized with the training set's statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise SystemExit("vr-mcmc demo needs scikit-learn (its bundled digits data set): pip install scikit-learn") \
            from exc
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # pixels that are always 0 in the training set stay 0

    def tensor(a, dtype):
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

    return (tensor((x_train - mean) / std, torch.float32), tensor(y_train, torch.long),
            tensor((x_test - mean) / std, torch.float32), tensor(y_test, torch.long))


def _loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class _Counting:
    """A sampler mix-in: ``stats["data_passes"]``, the per-example gradients computed so far over N.

    Its step also zeroes the gradients at the start of a closure (the closure contract of torch.optim),
    so that a closure that only backpropagates does not add to the gradient already there.
    """

    def step(self, closure: Callable | None = None, **kwargs: Any) -> Any:
        if closure is not None:
            inner = closure

            def closure() -> Any:
                self.zero_grad()
                return inner()

        out = super().step(closure, **kwargs)
        evals = self.stats.get("grad_evals", float("nan"))
        self._grad_evals = getattr(self, "_grad_evals", 0.0) + (0.0 if math.isnan(evals) else evals)
        self.stats["data_passes"] = self._grad_evals / self.num_data
        return out


class CountingSGLD(_Counting, torch_sample.SGLD):
    """`torch_sample.SGLD` with ``stats["data_passes"]``."""


class CountingSAGALD(_Counting, torch_sample.SAGALD):
    """`torch_sample.SAGALD` with ``stats["data_passes"]``."""


class CountingSVRGLD(_Counting, torch_sample.SVRGLD):
    """`torch_sample.SVRGLD` with ``stats["data_passes"]``."""


def _sampler_fn(method: str, cfg: Config, x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], Any]:
    n = len(x)
    prior = priors.Normal(cfg.prior_std)
    steps_per_epoch = math.ceil(n / cfg.batch_size)

    def build(model: nn.Module):
        if method == "SGLD":
            return CountingSGLD(model.parameters(), cfg.lr, n, prior=prior)
        if method == "SAGA-LD":
            # check=False: the engine's per-batch consistency check (tested for this MLP's layers) would cost 30% here
            engine = PerExampleGradients(model, check=False)
            return CountingSAGALD(model.parameters(), cfg.lr, n, engine=engine, prior=prior)
        # the full-gradient pass: chunks of the training set, already on the device
        chunks = [(torch.arange(s, min(s + 512, n)), x[s : s + 512], y[s : s + 512]) for s in range(0, n, 512)]
        return CountingSVRGLD(model.parameters(), cfg.lr, n, snapshot_every=steps_per_epoch, loader=chunks,
                              loss_fn=lambda xb, yb: F.cross_entropy(model(xb), yb), prior=prior)

    return build


def _recorders(x_test: torch.Tensor, y_test: torch.Tensor):
    rows = torch.arange(len(y_test), device=y_test.device)

    def log_probs(model: nn.Module) -> torch.Tensor:
        return F.log_softmax(model(x_test), dim=-1)

    def pointwise(model: nn.Module) -> torch.Tensor:
        return log_probs(model)[rows, y_test]

    record = {
        "accuracy": lambda m: (m(x_test).argmax(-1) == y_test).double().mean(),
        "test_loglik": lambda m: pointwise(m).double().mean(),
        "probs": lambda m: log_probs(m).exp(),
    }
    return record, pointwise


# -- results --------------------------------------------------------------------------------------


def _group_names(idata: Any) -> list[str]:
    if hasattr(idata, "groups") and callable(idata.groups):  # az.InferenceData (ArviZ 0.x)
        return list(idata.groups())
    return list(idata.children)  # xarray.DataTree (ArviZ 1.x)


def _group(idata: Any, name: str):
    """A group of an `az.InferenceData` (ArviZ 0.x) or `xarray.DataTree` (1.x) as an `xarray.Dataset`, or None."""
    if name not in _group_names(idata):
        return None
    return getattr(idata, name) if hasattr(idata, "groups") and callable(idata.groups) else idata[name].to_dataset()


# probabilities packed as 16-bit integers (CF scale_factor; xarray and ArviZ unpack them on reading): resolution
# 1.5e-5, and the many probabilities near 0 compress well. 65535 is the fill value, so 1.0 is stored as 65534.
PROBS_ENCODING = {"dtype": "uint16", "scale_factor": np.float32(1 / 65534), "_FillValue": np.uint16(65535),
                  "zlib": True}


def write_netcdf(idata: Any, path: Path) -> None:
    """The run as one netCDF file with a group per ArviZ group (readable by ``az.from_netcdf``); the
    ``probs`` variables packed (`PROBS_ENCODING`), the others compressed."""
    path = Path(path)
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    mode = "w"
    for name in _group_names(idata):
        ds = _group(idata, name)
        encoding = {var: dict(PROBS_ENCODING) if var == "probs" else {"zlib": True}
                    for var, da in ds.data_vars.items() if np.issubdtype(da.dtype, np.number)}
        ds.to_netcdf(tmp, mode=mode, group=name, engine="h5netcdf", encoding=encoding)
        mode = "a"
    tmp.replace(path)


def _predictive(idata: Any, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean log-likelihood on the test set of the running posterior predictive: entry k uses the
    draws 0..k of every chain (class probabilities averaged, then scored)."""
    probs = _group(idata, "posterior")["probs"].values.astype(np.float64)  # [chain, draw, n, classes]
    running = np.cumsum(probs.mean(0), axis=0) / np.arange(1, probs.shape[1] + 1)[:, None, None]
    accuracy = (running.argmax(-1) == y_test).mean(-1)
    ll = _group(idata, "log_likelihood")["obs"].values.astype(np.float64)  # [chain, draw, n]
    per_draw = np.logaddexp.reduce(ll, axis=0)  # log Σ_chains p(y_i | θ), [draw, n]
    counts = ll.shape[0] * np.arange(1, ll.shape[1] + 1)
    lpd = np.logaddexp.accumulate(per_draw, axis=0) - np.log(counts)[:, None]
    return accuracy, lpd.mean(-1)


def _diagnostics(idata: Any) -> tuple[float, float]:
    """The largest R-hat and the smallest bulk ESS over the scalar predictive quantities and the
    pointwise test log-likelihood."""
    import arviz as az

    post = _group(idata, "posterior")[["accuracy", "test_loglik"]]
    ll = _group(idata, "log_likelihood")[["obs"]].astype(np.float64)
    rhat = [float(np.nanmax(az.rhat(ds).to_array().values)) for ds in (post, ll)]
    ess = [float(np.nanmin(az.ess(ds, method="bulk").to_array().values)) for ds in (post, ll)]
    return max(rhat), min(ess)


def _uncertain_examples(idata: Any, k: int = 3) -> list[int]:
    """The ``k`` test examples whose posterior-mean probability of the true class is closest to 1/2."""
    p_true = np.exp(_group(idata, "log_likelihood")["obs"].values.astype(np.float64)).mean(axis=(0, 1))
    return [int(i) for i in np.argsort(np.abs(p_true - 0.5))[:k]]


def _summary_table(idata: Any, y_test: np.ndarray, examples: list[int]):
    """``az.summary`` of the per-draw test accuracy and log-likelihood and of p(true class) for a few examples."""
    import arviz as az

    post = _group(idata, "posterior")
    ds = post[["accuracy", "test_loglik"]].copy()
    for i in examples:
        ds[f"p_true[{i}]"] = post["probs"].isel(probs_dim_0=i, probs_dim_1=int(y_test[i])).astype(np.float64)
    return az.summary(ds, round_to=3)


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    """Trace and rank plots per method and accuracy/log-likelihood against data passes; the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plots; pip install matplotlib)")
        return []
    import arviz as az

    written = []
    for method, res in results.items():
        stem = FILE_NAMES[method]
        for kind, plot in (("trace", getattr(az, "plot_trace", None)), ("rank", getattr(az, "plot_rank", None))):
            if plot is None:
                continue
            try:
                with warnings.catch_warnings():  # deprecation notes between ArviZ and matplotlib versions
                    warnings.simplefilter("ignore")
                    axes = plot(res["idata"], var_names=["accuracy", "test_loglik"])
                fig = np.asarray(axes).ravel()[0].figure
                fig.suptitle(f"{method}: {kind} of each draw's test accuracy and mean test log-likelihood")
                fig.tight_layout()
                fig.savefig(out / f"{kind}_{stem}.png", dpi=90)
                plt.close(fig)
                written.append(f"{kind}_{stem}.png")
            except Exception as exc:  # a plotting API that differs (ArviZ 1.x) costs the plot, not the run
                print(f"(could not draw the {kind} plot of {method}: {type(exc).__name__}: {exc})")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, res in results.items():
        color = COLORS[method]
        for warm in (True, False):
            prefix = "warmup_" if warm else ""
            stats, post = _group(res["idata"], prefix + "sample_stats"), _group(res["idata"], prefix + "posterior")
            if stats is None or post is None or "data_passes" not in stats:
                continue
            passes = stats["data_passes"].values.mean(0)
            for ax, name in zip(axes, ("accuracy", "test_loglik")):
                ax.plot(passes, post[name].values.mean(0), color=color, lw=0.7, alpha=0.35 if warm else 0.6)
            if not warm:
                for ax, curve in zip(axes, res["running"]):
                    ax.plot(passes, curve, color=color, lw=2, label=f"{method}: posterior predictive")
        for ax in axes:
            ax.axvline(res["warmup_passes"], color=color, lw=0.8, ls=":")
    titles = ("test accuracy", "mean test log-likelihood")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("data passes per chain (per-example gradients / N)")
        ax.set_title(f"{title}: of single draws (thin, chain mean) and\nof the running posterior predictive (thick)",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(loc="lower right", fontsize=8)
    lo = min(np.nanmin(r["running"][0]) for r in results.values())
    axes[0].set_ylim(max(0.0, min(axes[0].get_ylim()[0], lo - 0.01)), 1.0)
    lo = min(np.nanmin(r["running"][1]) for r in results.values())
    axes[1].set_ylim(max(-2.0, min(axes[1].get_ylim()[0], lo - 0.05)), axes[1].get_ylim()[1])
    fig.suptitle("Bayesian MLP on digits, SGLD / SAGA-LD / SVRG-LD against cost (dotted: end of warmup)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_passes.png", dpi=90)
    plt.close(fig)
    written.append("accuracy_vs_passes.png")
    return written


def run(cfg: Config, out: str | Path = "vr_mcmc_demo", *, seed: int = 0, device: str = "cpu",
        progress: bool = True) -> dict[str, Any]:
    """Runs the three methods, prints the report, writes the files; returns {method: results}."""
    import pandas as pd

    import vr_mcmc

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    x_train, y_train, x_test, y_test = load_digits_split(cfg.test_size, device=dev)
    y_test_np = y_test.cpu().numpy()
    n = len(x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    num_warmup = cfg.warmup_epochs * steps_per_epoch
    total_steps = num_warmup + cfg.num_samples * cfg.thin
    record, pointwise = _recorders(x_test, y_test)

    def model_fn() -> nn.Module:
        return mlp((x_train.shape[1], cfg.hidden, 10), activation=nn.Tanh).to(dev)

    n_params = sum(p.numel() for p in model_fn().parameters())
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"vr-mcmc {vr_mcmc.__version__} demo: Bayesian MLP 64-{cfg.hidden}-10 (tanh, {n_params:,} parameters) on "
        f"scikit-learn's digits ({n} train / {len(y_test_np)} test), prior N(0, {cfg.prior_std:g}²), device {dev}")
    say(f"{cfg.num_chains} chains per method; step size h = {cfg.lr:g} (summed-loss units), batch {cfg.batch_size}; "
        f"{num_warmup} warmup steps ({cfg.warmup_epochs} epochs), then {cfg.num_samples} draws per chain, one every "
        f"{cfg.thin} steps ({total_steps} steps per chain)")

    results: dict[str, Any] = {}
    for method in METHODS:
        say(f"\nsampling with {method} ...")
        t0 = time.perf_counter()
        idata = vr_mcmc.sample(
            model_fn, _sampler_fn(method, cfg, x_train, y_train), _loss_fn, (x_train, y_train),
            batch_size=cfg.batch_size, num_chains=cfg.num_chains, num_warmup=num_warmup,
            num_samples=cfg.num_samples, thin=cfg.thin, record=record, log_likelihood=pointwise,
            observed_data={"obs": y_test_np}, seed=seed, progress=progress, save_warmup=True)
        wall = time.perf_counter() - t0
        path = out / f"{FILE_NAMES[method]}.nc"
        write_netcdf(idata, path)
        running = _predictive(idata, y_test_np)
        accuracy, loglik = float(running[0][-1]), float(running[1][-1])
        rhat, ess = _diagnostics(idata)
        stats = _group(idata, "sample_stats")
        warm_stats = _group(idata, "warmup_sample_stats")
        passes = float(stats["data_passes"].values[:, -1].mean())
        warmup_passes = float(warm_stats["data_passes"].values[:, -1].mean()) if warm_stats is not None else 0.0
        results[method] = dict(idata=idata, path=path, accuracy=accuracy, loglik=loglik, rhat=rhat, ess=ess,
                               running=running, wall=wall, passes=passes, warmup_passes=warmup_passes,
                               draw_accuracy=float(_group(idata, "posterior")["accuracy"].mean()))
        say(f"{method}: {wall:.1f} s, written {path}")

    examples = _uncertain_examples(results["SGLD"]["idata"])
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        for method, res in results.items():
            say(f"\n=== az.summary, {method} (posterior draws; p_true[i]: probability of test example i's true class, "
                "for the examples SGLD is least sure of)")
            say(_summary_table(res["idata"], y_test_np, examples).to_string())

    say(f"\n=== Comparison ({cfg.num_chains} chains x {cfg.num_samples} draws per method; posterior predictive = class "
        "probabilities averaged over all draws, then scored on the test set)")
    header = (f"{'method':<9}{'pred. acc':>10}{'pred. loglik':>13}{'draw acc':>9}{'max R-hat':>10}{'min ESS':>9}"
              f"{'wall s':>8}{'passes/chain':>13}")
    say(header)
    for method, res in results.items():
        say(f"{method:<9}{res['accuracy']:>10.4f}{res['loglik']:>13.4f}{res['draw_accuracy']:>9.4f}{res['rhat']:>10.3f}"
            f"{res['ess']:>9.0f}{res['wall']:>8.1f}{res['passes']:>13.1f}")
    say("pred. acc / pred. loglik: accuracy and mean log predictive density of the posterior predictive on the test "
        "set; draw acc: mean accuracy of single draws; max R-hat, min ESS (bulk): over the per-draw test accuracy, "
        "mean test log-likelihood and the 450 pointwise test log-likelihoods; passes/chain: per-example gradients "
        "per chain / N, warmup included")

    written = _plots(results, out)
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    files = [str(r["path"].name) for r in results.values()] + written + ["report.txt"]
    print(f"\nwritten to {out}/: {', '.join(files)}")
    print(f"inspect a run with: vr-mcmc summary {results['SGLD']['path']}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options on an argparse parser (used by `vr_mcmc.cli`)."""
    default = Config()
    parser.add_argument("--out", default="vr_mcmc_demo", help="output directory (default vr_mcmc_demo/)")
    parser.add_argument("--chains", type=int, default=None, help=f"chains per method (default {default.num_chains})")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"draws per chain after warmup (default {default.num_samples})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chains' initializations, batches and noise")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (for tests, ~10 s): 2 chains, 12 draws, MLP 64-16-10")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else Config()
    if args.chains is not None:
        cfg = replace(cfg, num_chains=args.chains)
    if args.samples is not None:
        cfg = replace(cfg, num_samples=args.samples)
    return cfg


def main(args: argparse.Namespace) -> int:
    for flag in ("chains", "samples"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "chains" else 4):
            raise SystemExit(f"vr-mcmc demo: --{flag} must be at least {2 if flag == 'chains' else 4} "
                             "(R-hat needs two chains and a few draws)")
    if args.seed < 0:
        raise SystemExit("vr-mcmc demo: --seed must be >= 0")
    threads = torch.get_num_threads()
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)  # the model is tiny: one thread is faster than several here
    try:
        run(config_from_args(args), args.out, seed=args.seed, device=args.device, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    return 0
