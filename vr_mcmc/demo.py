"""The `vr-mcmc demo` experiment: does variance reduction pay on a Bayesian MLP? Measured against HMC.

The posterior (`vr_mcmc.digits`): an MLP 64-32-10 with tanh (2,410 parameters) on scikit-learn's digits
(1347 train / 450 test images, bundled, no download), prior N(0, 0.5²), softmax likelihood, at a
temperature T. Its reference predictive comes from long full-batch HMC and ships with the package
(`vr_mcmc.predictive.load_reference`; rebuilt by ``benchmarks/bnn_reference.py``).

Two settings of ``benchmarks/bnn_vr.py``, each method (SGLD, SAGA-LD, SVRG-LD, SGLD-CV) at its best step
size there, ``--chains`` chains (seeds 0, 1, …) of ``--passes`` data passes (per-example gradients / N,
everything included) through `vr_mcmc.sample`, batch 32:

- the cold posterior T = 0.1 (common practice for BNNs): the most favourable regime for variance
  reduction that the benchmark found at a batch size the demo can afford. SGLD's minibatch noise is
  about a fifth of its injected noise there (``noise_ratio`` ≈ 0.2); SAGA-LD ties SGLD per pass,
  SGLD-CV leads it for the first ~10 passes, and none reaches SGLD's 100-pass accuracy in fewer passes;
- T = 1: SGLD's minibatch noise is a few percent of its injected noise, so SGLD is already close to
  the exact Langevin diffusion and the variance-reduced methods only cost more.

In no regime of the benchmark did variance reduction pay (benchmarks/RESULTS.md says why: at SGLD's best
step its noise_ratio is below 1, the remaining error is the Monte Carlo error of a slowly mixing chain,
and where SGLD's noise does dominate, the variance-reduced estimators' stale control variates are
noisier still). The demo prints the measured figures, not a claim.

Each chain's predictive after b passes is the mean of its draws with passes in (b/2, b] (the first half is
burn-in), scored against the reference by total variation (TV) and agreement (Izmailov et al. 2021),
test log-likelihood and accuracy; ``noise_ratio`` comes from one extra short chain per method with the
per-example engine attached (the timed chains run without it). These are exactly the benchmark's runs
for seeds 0…C−1, so the figures match its table for the same chains (on the same machine and threads).

Printed: the versions and thread count, per setting a table (TV, agreement, log-likelihood and accuracy at
the end, the passes and wall time each method needs to reach SGLD's final TV, noise_ratio), and
``az.summary`` of each draw's test accuracy and log-likelihood. Written to ``--out``: one netCDF file per
setting and method (``vr-mcmc summary FILE``), ``tv_vs_passes.png`` and ``report.txt``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .digits import DigitsBNN, load_digits_split
from .predictive import PredictiveReference, load_reference
from .sg_compare import METHODS, Run, budget_scores, run_method

__all__ = ["DEMO_SETTINGS", "Config", "Setting", "load_digits_split", "main", "run", "write_netcdf"]

COLORS = {"SGLD": "tab:blue", "SAGA-LD": "tab:red", "SVRG-LD": "tab:green", "SGLD-CV": "tab:purple"}
STYLES = {"SGLD": "-", "SAGA-LD": "--", "SVRG-LD": "-.", "SGLD-CV": ":"}


@dataclass(frozen=True)
class Setting:
    """One regime of the demo: the posterior, the batch size and each method's step size."""

    key: str
    title: str
    problem: DigitsBNN
    batch_size: int
    steps: dict[str, float]


# Step sizes: each method's best in benchmarks/bnn_vr.py for that regime (see benchmarks/RESULTS.md).
DEMO_SETTINGS = (
    Setting("cold", "cold posterior T = 0.1, batch 32: variance reduction's best case here",
            DigitsBNN(temperature=0.1), 32,
            {"SGLD": 6e-4, "SAGA-LD": 6e-4, "SVRG-LD": 6e-4, "SGLD-CV": 1.2e-3}),
    Setting("base", "T = 1, batch 32: SGLD's minibatch noise is small, VR cannot help",
            DigitsBNN(), 32,
            {"SGLD": 1.2e-3, "SAGA-LD": 1.2e-3, "SVRG-LD": 1.2e-3, "SGLD-CV": 1.2e-3}),
)


@dataclass(frozen=True)
class Config:
    """Sizes of one demo run (the defaults are the full run; `QUICK` is the test-sized one)."""

    passes: float = 100.0
    num_chains: int = 3
    diagnostic_passes: float = 10.0
    draws_per_pass: float = 4.0
    cv_centre_passes: float = 5.0


QUICK = Config(passes=4.0, num_chains=2, diagnostic_passes=1.0, draws_per_pass=2.0, cv_centre_passes=1.0)
BUDGETS = (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 80, 100, 126, 160, 200)


# -- ArviZ files ------------------------------------------------------------------------------------


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


# -- one setting ------------------------------------------------------------------------------------


def _scores(runs: list[Run], reference: PredictiveReference, budgets: list[float]) -> dict[str, np.ndarray]:
    """Per chain and budget: TV, agreement, log-likelihood, accuracy, seconds ([chains, budgets] each)."""
    per_chain = [budget_scores(r, reference, budgets) for r in runs]
    return {k: np.stack([s[k] for s in per_chain]) for k in per_chain[0]}


def _passes_to(budgets: list[float], tv: np.ndarray, target: float) -> tuple[float, int | None]:
    hit = np.nonzero(np.nanmean(tv, 0) <= target)[0] if np.isfinite(tv).any() else np.array([], dtype=int)
    return (budgets[hit[0]], int(hit[0])) if hit.size else (math.inf, None)


def run_setting(setting: Setting, cfg: Config, *, seed: int, device: str, progress: bool, out: Path,
                say) -> dict[str, Any]:
    """Every method on one setting; prints its table and summaries, writes its netCDF files."""
    reference = load_reference(setting.problem)
    data = setting.problem.data(device)
    budgets = [b for b in BUDGETS if b <= cfg.passes]
    common = dict(draws_per_pass=cfg.draws_per_pass, cv_centre_passes=cfg.cv_centre_passes, data=data)
    for method in METHODS:  # first calls pay one-time costs (allocator, caches): keep them out of the timings
        run_method(setting.problem, method, setting.steps[method], setting.batch_size, 1.0, **common)
    results: dict[str, Any] = {}
    for method in METHODS:
        lr = setting.steps[method]
        t0 = time.perf_counter()
        runs = run_method(setting.problem, method, lr, setting.batch_size, cfg.passes, seed=seed,
                          num_chains=cfg.num_chains, progress=progress, keep_idata=True, **common)
        diag = run_method(setting.problem, method, lr, setting.batch_size, min(cfg.passes, cfg.diagnostic_passes),
                          seed=100, diagnostics=True, **common)[0]
        scores = _scores(runs, reference, budgets)
        path = out / f"{setting.key}_{method.lower()}.nc"
        write_netcdf(runs[0].idata, path)
        results[method] = dict(lr=lr, runs=runs, scores=scores, noise_ratio=diag.noise_ratio, path=path,
                               wall=time.perf_counter() - t0)
    end = len(budgets) - 1
    target = float(np.nanmean(results["SGLD"]["scores"]["tv"][:, end]))
    sgld_secs = float(np.nanmean(results["SGLD"]["scores"]["seconds"][:, end]))
    say(f"\n=== {setting.title}")
    meta = reference.meta
    say(f"posterior: {setting.problem.name}; reference: HMC, {meta.get('chains')} chains x "
        f"{meta.get('draws_per_chain')} draws (its halves differ by TV {meta.get('tv_halves', math.nan):.4f}); "
        f"{cfg.num_chains} chains per method, {cfg.passes:g} passes each")
    say(f"{'method':<9}{'step h':>9}{'TV':>8}{'agree':>8}{'loglik':>9}{'acc':>8}{'passes to SGLD TV':>22}"
        f"{'wall s':>8}{'noise_ratio':>12}")
    for method, res in results.items():
        s = res["scores"]
        b, k = _passes_to(budgets, s["tv"], target * (1 + 1e-9))
        secs = float(np.nanmean(s["seconds"][:, k])) if k is not None else math.inf
        res.update(passes_to_target=b, seconds_to_target=secs)
        reach = "never" if not math.isfinite(b) else f"{b:g} ({b / budgets[end]:.2f}x, {secs / sgld_secs:.2f}x s)"
        say(f"{method:<9}{res['lr']:>9.2g}{np.nanmean(s['tv'][:, end]):>8.4f}{np.nanmean(s['agreement'][:, end]):>8.4f}"
            f"{np.nanmean(s['loglik'][:, end]):>9.4f}{np.nanmean(s['accuracy'][:, end]):>8.4f}{reach:>22}"
            f"{np.nanmean(s['seconds'][:, end]):>8.1f}{res['noise_ratio']:>12.3g}")
    say(f"TV / agree / loglik / acc: the predictive of passes ({budgets[end] / 2:g}, {budgets[end]:g}] of each chain "
        f"(mean over chains) against the reference: total variation, top-class agreement, test log-likelihood, "
        f"accuracy. passes to SGLD TV: the first budget at which a method's TV is at most SGLD's final "
        f"{target:.4f} (its fraction of SGLD's passes and wall time). noise_ratio: the variance the gradient "
        "estimate's noise adds to a step over the injected noise's (0: exact Langevin; ≳1: mostly SGD noise).")
    _summaries(results, say)
    return dict(setting=setting, results=results, budgets=budgets, target=target,
                reference_tv=reference.meta.get("tv_halves", math.nan))


def _summaries(results: dict[str, Any], say) -> None:
    import arviz as az
    import pandas as pd

    rows = []
    for method, res in results.items():
        post = _group(res["runs"][0].idata, "posterior")[["accuracy", "test_loglik"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = az.summary(post, round_to=4)
        table.index = [f"{method}: {i}" for i in table.index]
        rows.append(table)
    with pd.option_context("display.width", 130, "display.max_columns", 20):
        say("az.summary of each draw's test accuracy and mean test log-likelihood (all draws; the first half is "
            "the chains' burn-in, so R-hat reads high where the chains still move from their start):")
        say(pd.concat(rows).to_string())


# -- plot -------------------------------------------------------------------------------------------


def plot(settings: list[dict[str, Any]], path: Path) -> bool:
    """TV to the reference against data passes, one panel per setting, every method and chain."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(settings), figsize=(6.2 * len(settings), 4.8), squeeze=False)
    for ax, st in zip(axes[0], settings):
        budgets = np.array(st["budgets"], dtype=float)
        for method, res in st["results"].items():
            tv = res["scores"]["tv"]
            ax.plot(budgets, np.nanmean(tv, 0), color=COLORS[method], ls=STYLES[method], lw=2.2,
                    label=f"{method} (h={res['lr']:.2g}), mean of {tv.shape[0]} chains")
            for row in tv:
                ax.plot(budgets, row, color=COLORS[method], ls=STYLES[method], lw=0.7, alpha=0.35)
        ax.axhline(st["target"], color="black", ls="--", lw=1, label="SGLD's TV at the end (the target)")
        ax.axhline(st["reference_tv"], color="0.45", ls=":", lw=1.2, label="reference: TV between its halves")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("data passes (per-example gradients / N)", fontsize=10)
        ax.set_ylabel("total variation to the HMC predictive", fontsize=10)
        ax.set_title(st["setting"].title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper right")
        ax.tick_params(labelsize=9)
    fig.suptitle("Bayesian MLP on digits: SG samplers against the HMC reference (thin lines: single chains)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- the command ------------------------------------------------------------------------------------


def run(cfg: Config, out: str | Path = "vr_mcmc_demo", *, seed: int = 0, device: str = "cpu",
        progress: bool = True, settings: tuple[Setting, ...] = DEMO_SETTINGS) -> list[dict[str, Any]]:
    """Runs every setting, prints the report, writes the files; returns the per-setting results."""
    import arviz as az

    import vr_mcmc

    start = time.perf_counter()
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)  # budgets a method never reaches
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"vr-mcmc {vr_mcmc.__version__} demo: SGLD, SAGA-LD, SVRG-LD, SGLD-CV on a Bayesian MLP 64-32-10 "
        f"(2,410 parameters) on scikit-learn's digits, against an HMC reference predictive")
    say(f"torch {torch.__version__}, numpy {np.__version__}, arviz {az.__version__}, python "
        f"{platform.python_version()}, {torch.get_num_threads()} torch thread(s), device {dev}. The draws are the "
        "same for a seed on one machine with the same thread count; timings vary with the machine and its load.")
    done = [run_setting(s, cfg, seed=seed, device=device, progress=progress, out=out, say=say) for s in settings]
    written = [r["path"].name for st in done for r in st["results"].values()]
    if plot(done, out / "tv_vs_passes.png"):
        written.append("tv_vs_passes.png")
    else:
        say("(matplotlib is not installed: no plot; pip install matplotlib)")
    say(f"\nelapsed: {time.perf_counter() - start:.0f} s")
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print(f"written to {out}/: {', '.join([*written, 'report.txt'])}")
    print(f"inspect a run with: vr-mcmc summary {done[0]['results']['SGLD']['path']}")
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options on an argparse parser (used by `vr_mcmc.cli`)."""
    default = Config()
    parser.add_argument("--out", default="vr_mcmc_demo", help="output directory (default vr_mcmc_demo/)")
    parser.add_argument("--chains", type=int, default=None, help=f"chains per method (default {default.num_chains})")
    parser.add_argument("--passes", type=float, default=None,
                        help=f"data passes per chain (default {default.passes:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first chain (chain c uses seed + c)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run ({QUICK.num_chains} chains, {QUICK.passes:g} passes; for tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else Config()
    if args.chains is not None:
        cfg = replace(cfg, num_chains=args.chains)
    if args.passes is not None:
        cfg = replace(cfg, passes=args.passes)
    return cfg


def main(args: argparse.Namespace) -> int:
    if args.chains is not None and args.chains < 2:
        raise SystemExit("vr-mcmc demo: --chains must be at least 2 (R-hat needs two chains)")
    if args.passes is not None and args.passes < 4:
        raise SystemExit("vr-mcmc demo: --passes must be at least 4")
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
