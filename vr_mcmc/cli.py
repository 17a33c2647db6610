"""The `vr-mcmc` command.

Arguments are parsed before anything heavy is imported: torch and the library load inside each command, so
that ``vr-mcmc --help`` and ``vr-mcmc summary --help`` answer at once (``vr-mcmc demo ...`` imports the demo
module, which defines its options, before parsing them)."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    """Samples a Bayesian MLP on scikit-learn's digits with SGLD, SAGA-LD, SVRG-LD and SGLD-CV (3 chains each,
    through vr_mcmc.sample) in a cold posterior (variance reduction's best case measured) and at T = 1, scores
    each against the shipped HMC reference predictive (total variation, agreement) with each method's noise_ratio,
    and says whether variance reduction paid (on this network it does not); prints the tables and ArviZ summaries,
    writes netCDF results, a plot and the report to --out."""
    from . import demo

    return demo.main(args)


def _check(args: argparse.Namespace) -> int:
    """Per-example gradients of three networks, checked against a loop of single-example backward passes."""
    import torch
    import torch.nn.functional as F

    from .models import TransformerClassifier, cnn, mlp
    from .per_example import PerExampleGradients, sq_norms
    from .per_example.reference import loop_per_example_grads

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    b = args.batch_size
    cases = {
        "MLP 784-512-512-10": (mlp((784, 512, 512, 10)), torch.randn(b, 784)),
        "CNN 3x32x32, 4 conv": (cnn(), torch.randn(b, 3, 32, 32)),
        "Transformer block": (TransformerClassifier(), torch.randint(0, 50, (b, 12))),
    }
    print(f"vr-mcmc {__version__}: per-example gradients, batch {b}, float64, device {device}")
    print()
    print(f"{'model':<22}{'params':>10}{'max rel. error':>16}{'engine s':>10}{'loop s':>9}")
    worst = 0.0
    for name, (model, x) in cases.items():
        model = model.to(device, torch.float64)
        x = x.to(device, torch.float64) if x.is_floating_point() else x.to(device)
        y = torch.randint(0, 4, (b,), device=device)
        engine = PerExampleGradients(model, loss_reduction="mean")
        for _ in range(2):  # the first pass pays one-time costs (kernel selection, allocation)
            t0 = time.perf_counter()
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = engine.collect()
            norms = sq_norms(grads)
            dense = {n: g.dense() for n, g in grads.items()}
            t_engine = time.perf_counter() - t0
        engine.remove()
        for _ in range(2):
            t0 = time.perf_counter()
            ref = loop_per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
            t_loop = time.perf_counter() - t0
        err = max(float((dense[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-300)) for n in ref)
        ref_norms = sum(r.flatten(1).square().sum(1) for r in ref.values())
        err = max(err, float(((norms - ref_norms).abs() / ref_norms).max()))
        worst = max(worst, err)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<22}{n_params:>10,}{err:>16.1e}{t_engine:>10.3f}{t_loop:>9.3f}")
    ok = worst <= 1e-10
    print(f"\n{'OK' if ok else 'FAILED'}: largest relative error {worst:.1e} (bar 1e-10 in float64)")
    return 0 if ok else 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input takes sizes joined by x, e.g. 3x32x32; got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input sizes must be positive, got {text!r}")
    return shape


def _memory(args: argparse.Namespace) -> int:
    """The gradient-table memory of each strategy for an architecture and data size (the README's "Gradient
    tables" section explains the strategies)."""
    import torch

    from .models import ARCHITECTURES
    from .storage import plan

    build, default_shape = ARCHITECTURES[args.arch]
    shape = args.input or default_shape
    model = build(shape, args.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    table = plan(model, torch.zeros(1, *shape), args.num_data, rank=args.rank, block_size=args.block_size)
    print(f"{args.arch}, input {'x'.join(map(str, shape))}, {n_params:,} parameters")
    print(table.format(per_layer=args.per_layer))
    return 0


def _read_run(path: Path):
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.from_netcdf(str(path))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(args: argparse.Namespace) -> int:
    """Diagnostics of a saved run (a netCDF file written by vr_mcmc.sample's checkpoint, the demo, or
    az.InferenceData.to_netcdf): ArviZ summary of the posterior, divergences, sampler statistics (data_passes: the final
    count), the log predictive density of the log_likelihood observations (PSIS-LOO with --loo, for training data),
    attributes; a note when the run is too short for R-hat and ESS."""
    import arviz as az
    import numpy as np
    import pandas as pd

    from .demo import _group, _group_names

    path = Path(args.file)
    if not path.exists():
        print(f"vr-mcmc summary: {path}: no such file", file=sys.stderr)
        return 2
    if path.is_dir():
        hint = " (a checkpoint directory? its results are in results.nc)" if (path / "results.nc").exists() else ""
        print(f"vr-mcmc summary: {path} is a directory, not a netCDF file{hint}", file=sys.stderr)
        return 2
    try:
        idata = _read_run(path)
        groups = _group_names(idata)
    except Exception as exc:  # whatever the netCDF/HDF5 readers raise for a file that is not theirs
        print(f"vr-mcmc summary: cannot read {path} as an ArviZ netCDF file ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    post = _group(idata, "posterior")
    if post is None or not post.data_vars:
        print(f"vr-mcmc summary: {path} holds no posterior draws (groups: {', '.join(groups) or 'none'})",
              file=sys.stderr)
        return 2

    print(f"{path}: groups {', '.join(groups)}")
    attrs = dict(post.attrs)
    chains, draws = post.sizes.get("chain", 1), post.sizes.get("draw", 0)
    line = f"{chains} chains x {draws} draws"
    if "sampling_time" in attrs:
        line += f", sampling time {float(attrs.pop('sampling_time')):.1f} s"
    if "tuning_steps" in attrs:
        line += f", {attrs.pop('tuning_steps')} warmup steps"
    print(line)
    if draws < SHORT_RUN:
        print(f"note: {draws} draws per chain is too few for R-hat and ESS to mean much (a short or --quick run); "
              f"use at least {SHORT_RUN} per chain, better several hundred")
    if attrs:
        print("attributes: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(attrs.items())))

    def extra_dims(var) -> tuple[int, ...]:
        return tuple(size for dim, size in var.sizes.items() if dim not in ("chain", "draw"))

    names = list(post.data_vars)
    if args.var:
        unknown = [v for v in args.var if v not in names]
        if unknown:
            print(f"vr-mcmc summary: no posterior variable {unknown}; the posterior has {names}", file=sys.stderr)
            return 2
        chosen = list(args.var)
    else:
        total = sum(math.prod(extra_dims(post[v])) for v in names)
        chosen = names if total <= args.max_quantities else [v for v in names if not extra_dims(post[v])]
    skipped = [v for v in names if v not in chosen]
    if chosen:
        print(f"\n=== posterior: az.summary of {len(chosen)} variable(s)")
        with warnings.catch_warnings(), pd.option_context("display.width", 160, "display.max_rows", 500,
                                                          "display.max_columns", 20):
            warnings.simplefilter("ignore")
            print(az.summary(post[chosen], round_to=3).to_string())
    if skipped:
        count = sum(math.prod(extra_dims(post[v])) for v in skipped)
        print(f"\nskipped {len(skipped)} non-scalar variable(s), {count:,} quantities (more than --max-quantities "
              f"{args.max_quantities}; choose with --var NAME); their worst diagnostics:")
        for v in skipped:
            shape = "x".join(map(str, extra_dims(post[v])))
            da = post[[v]].astype(np.float64)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                rhat = float(np.nanmax(az.rhat(da)[v].values)) if chains > 1 and draws >= 4 else float("nan")
                ess = float(np.nanmin(az.ess(da, method="bulk")[v].values)) if draws >= 4 else float("nan")
            print(f"  {v} [{shape}]: max R-hat {rhat:.3f}, min bulk ESS {ess:.0f}")

    stats = _group(idata, "sample_stats")
    if stats is not None and stats.data_vars:
        print("\n=== sample_stats (mean per chain; data_passes: the final count)")
        if "diverging" in stats:
            div = stats["diverging"].values.astype(bool)
            per_chain = ", ".join(str(int(d)) for d in div.reshape(div.shape[0], -1).sum(1))
            print(f"divergences: {int(div.sum())} of {div.size} draws (per chain: {per_chain})")
        else:
            print("divergences: none recorded (the sampler records no 'diverging' statistic)")
        # data_passes is a running count: its final value (the largest) is the chain's, not its mean
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN statistic (e.g. noise_ratio without engine)
            table = {("data_passes (final)" if k == "data_passes" else k):
                     (np.nanmax if k == "data_passes" else np.nanmean)(
                         stats[k].values.reshape(stats[k].shape[0], -1).astype(np.float64), axis=1)
                     for k in stats.data_vars if k != "diverging" and stats[k].ndim == 2}
        if table:
            frame = pd.DataFrame(table, index=[f"chain {c}" for c in range(chains)]).T
            with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
                print(frame.to_string())
    else:
        print("\nno sample_stats group")

    loglik = _group(idata, "log_likelihood")
    if loglik is not None:
        _log_predictive(loglik)
        if args.loo:
            _loo(idata)
        else:
            print("(PSIS-LOO estimates out-of-sample fit from the *training* data's pointwise log-likelihood: "
                  "if the log_likelihood group holds the training data, --loo computes it)")
    warm = [g for g in groups if g.startswith("warmup_")]
    if warm:
        print(f"\nwarmup draws are saved too ({', '.join(warm)}); the summary above is of the posterior draws")
    return 0


SHORT_RUN = 100  # draws per chain under which `summary` notes that R-hat and ESS mean little


def _log_predictive(loglik) -> None:
    """The log pointwise predictive density of the log_likelihood group's observations, Σ_i log mean_s p(y_i|θ_s):
    on held-out data (the demo records the test set) this is the test log predictive density."""
    import numpy as np
    from scipy.special import logsumexp

    for name in loglik.data_vars:
        values = loglik[name].values.astype(np.float64)
        flat = values.reshape(-1, *values.shape[2:]).reshape(values.shape[0] * values.shape[1], -1)
        lpd = logsumexp(flat, axis=0) - np.log(flat.shape[0])
        print(f"\n=== log predictive density of the {flat.shape[1]} observations in log_likelihood/{name}: "
              f"{lpd.sum():.2f} (mean {lpd.mean():.4f} per observation), Σ_i log mean over draws of p(y_i | θ); "
              "for held-out data (the demo's are the test set) this is the test log predictive density")


def _loo(idata) -> None:
    import arviz as az
    import numpy as np

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loo = az.loo(idata)
        print(f"\n=== PSIS-LOO (valid when log_likelihood holds the training data): elpd_loo "
              f"{float(loo['elpd_loo']):.2f} (se {float(loo['se']):.2f}), p_loo {float(loo['p_loo']):.2f}, "
              f"{int((np.asarray(loo['pareto_k']) > 0.7).sum())} of {np.asarray(loo['pareto_k']).size} "
              "Pareto k above 0.7")
        if caught:
            first = str(caught[0].message).split(". ")[0]
            print(f"({len(caught)} warning(s) from az.loo: {first})")
    except Exception as exc:
        print(f"\n(az.loo failed: {type(exc).__name__}: {exc})")


def build_parser(with_demo_options: bool = True) -> argparse.ArgumentParser:
    """The parser; ``with_demo_options=False`` leaves out the demo's options, whose definitions import the demo
    module (and torch): `main` asks for them only when the command is ``demo``."""
    parser = argparse.ArgumentParser(
        prog="vr-mcmc",
        description="Variance-reduced SG-MCMC for PyTorch networks: per-example gradients, samplers, diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"vr-mcmc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="SG samplers on a Bayesian MLP against an HMC reference: does VR pay?",
                          description=_demo.__doc__)
    if with_demo_options:
        from .demo import add_arguments

        add_arguments(demo)
    demo.set_defaults(func=_demo)

    summary = sub.add_parser("summary", help="diagnostics of a saved run (netCDF)", description=_summary.__doc__)
    summary.add_argument("file", help="a netCDF file, e.g. vr_mcmc_demo/cold_sgld.nc or CHECKPOINT_DIR/results.nc")
    summary.add_argument("--var", nargs="+", default=None, help="posterior variables to summarize (default: all, "
                         "or only the scalars when there are more than --max-quantities)")
    summary.add_argument("--max-quantities", type=int, default=40,
                         help="summarize every quantity up to this many (default 40)")
    summary.add_argument("--loo", action="store_true", help="PSIS-LOO of the log_likelihood group: only when it "
                         "holds the training data's pointwise log-likelihood (the demo's is the test set)")
    summary.set_defaults(func=_summary)

    check = sub.add_parser("check", help="check per-example gradients against a loop of single-example backwards",
                           description=_check.__doc__)
    check.add_argument("--batch-size", type=int, default=32, help="examples per batch (default 32)")
    check.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_check)

    memory = sub.add_parser(
        "memory", help="gradient-table memory of each storage strategy", description=_memory.__doc__
    )
    memory.add_argument("--arch", required=True, choices=["lenet5", "vgg16", "resnet34", "mlp"])
    memory.add_argument("--num-data", type=int, required=True, help="number of examples N")
    memory.add_argument("--input", type=_shape, default=None, help="input shape, e.g. 3x32x32 (default per arch)")
    memory.add_argument("--num-classes", type=int, default=10)
    memory.add_argument("--rank", type=int, default=1, help="rank r of the low-rank columns (default 1)")
    memory.add_argument("--block-size", type=int, default=128, help="partition block size k (default 128)")
    memory.add_argument("--per-layer", action="store_true", help="one row per layer, not only the total")
    memory.set_defaults(func=_memory)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_demo_options=_command(argv) == "demo")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    for flag in ("num_data", "rank", "block_size", "num_classes"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
