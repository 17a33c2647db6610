"""Where variance reduction pays: SG samplers on digits BNN posteriors against HMC references (issue 12).

    python benchmarks/bnn_vr.py                 # every regime (about 30 min on one free core)
    python benchmarks/bnn_vr.py --regimes base cold --seeds 3
    python benchmarks/bnn_vr.py --score-only    # re-score the cached runs (after a reference changed)

For each regime (batch size B, training-set size N, temperature T; each (N, T) has its own reference
in `vr_mcmc/references/`, built by ``benchmarks/bnn_reference.py``), every method of
`vr_mcmc.sg_compare` runs at each step size of the regime's grid and each seed for ``--passes`` data
passes (per-example gradients / N, all work included), one chain per seed through `vr_mcmc.sample`.
After each budget b of a grid from 1 to ``--passes`` the chain's predictive (draws of passes (b/2, b])
is scored against the reference: total variation (TV) and agreement (Izmailov et al. 2021), test
log-likelihood, accuracy, and the chain's wall time to reach b. A separate short chain per (method,
step) with the per-example engine attached measures ``noise_ratio`` (timed chains run without it).

Printed per regime: the table of every (method, step) at each budget (mean over seeds), then the
headline: SGLD's TV at ``--passes`` passes at its best step (the target), and for each method at its
best step the passes and wall time it needs to reach that target (mean TV over seeds ≤ target; the
spread: the range of passes over single seeds), as fractions of SGLD's. Writes the raw per-run
figures to ``benchmarks/results/bnn_vr.json`` and the plot ``benchmarks/results/bnn_vr.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vr_mcmc.digits import DigitsBNN
from vr_mcmc.predictive import PredictiveReference, load_reference
from vr_mcmc.sg_compare import METHODS, budget_predictives, run_method, score_predictives

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "bnn_vr"
RESULTS = HERE / "results"
BUDGETS = [1, 1.5, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 80, 100, 126, 160, 200]


@dataclass(frozen=True)
class Regime:
    name: str
    batch_size: int
    num_train: int = 1347
    temperature: float = 1.0
    steps: tuple[float, ...] = (1.5e-4, 3e-4, 6e-4, 1.2e-3)  # h, in summed-loss units

    @property
    def problem(self) -> DigitsBNN:
        return DigitsBNN(temperature=self.temperature, num_train=self.num_train)

    def label(self) -> str:
        return f"{self.name}: B={self.batch_size}, N={self.num_train}, T={self.temperature:g}"


WIDE = (1.5e-4, 3e-4, 6e-4, 1.2e-3, 2.4e-3)  # where the best step sat at the edge of the first grid
REGIMES = {
    "cold": Regime("cold", 32, temperature=0.1),
    "base": Regime("base", 32, steps=WIDE),
    "large-batch": Regime("large-batch", 128, steps=(*WIDE, 4.8e-3)),
    "small-N": Regime("small-N", 32, num_train=300, steps=(6.75e-4, 1.35e-3, 2.7e-3, 5.4e-3, 1.08e-2)),  # Hessian ∝ N
    "small-batch": Regime("small-batch", 8),
    "cold-small-batch": Regime("cold-small-batch", 8, temperature=0.1),
}


def cache_path(regime: Regime, method: str, lr: float) -> Path:
    return CACHE / regime.name / f"{method}_{lr:g}.npz"


def run_regime(regime: Regime, args) -> None:
    problem = regime.problem
    data = problem.data()
    budgets = [b for b in BUDGETS if b <= args.passes]
    for method in args.methods:  # first calls pay one-time costs (imports, allocator, caches): not in the timings
        run_method(problem, method, regime.steps[0], regime.batch_size, 8, data=data, diagnostics=True)
    for lr in regime.steps:
        for method in args.methods:
            path = cache_path(regime, method, lr)
            if path.exists() and not args.rerun:
                continue
            t0 = time.perf_counter()
            runs = run_method(problem, method, lr, regime.batch_size, args.passes, seed=0, num_chains=args.seeds,
                              data=data)
            diag = run_method(problem, method, lr, regime.batch_size, min(args.passes, args.diagnostic_passes),
                              seed=100, data=data, diagnostics=True)[0]
            windows = [budget_predictives(r, budgets) for r in runs]
            path.parent.mkdir(parents=True, exist_ok=True)
            probs = np.stack([w[0] for w in windows]).astype(np.float32)
            np.savez_compressed(path, budgets=np.array(budgets), probs=probs,
                                seconds=np.stack([w[1] for w in windows]), noise_ratio=diag.noise_ratio,
                                passes_end=np.array([r.passes[-1] for r in runs]))
            print(f"  {regime.name:<12} {method:<8} h={lr:<8g} {time.perf_counter() - t0:6.1f} s  "
                  f"noise_ratio {diag.noise_ratio:.3g}", flush=True)


def score_regime(regime: Regime, reference: PredictiveReference, methods) -> dict:
    out = {}
    for lr in regime.steps:
        for method in methods:
            path = cache_path(regime, method, lr)
            if not path.exists():
                continue
            with np.load(path) as f:
                budgets, probs, seconds = f["budgets"], f["probs"].astype(np.float64), f["seconds"]
                noise_ratio = float(f["noise_ratio"])
            scores = score_predictives(probs, reference)
            out[(method, lr)] = dict(budgets=budgets.tolist(), tv=scores["tv"], agreement=scores["agreement"],
                                     loglik=scores["loglik"], accuracy=scores["accuracy"], seconds=seconds,
                                     noise_ratio=noise_ratio)
    return out


def first_budget(budgets, tv, target):
    hit = np.nonzero(tv <= target)[0]
    return (budgets[hit[0]], hit[0]) if hit.size else (math.inf, None)


def seconds_per_pass(regime: Regime, lrs: dict[str, float], passes: float = 10, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds per data pass of each method at its step, chains of ``passes`` passes timed in turn
    (SGLD, SAGA-LD, ..., SGLD, ...) so that a change of the machine's load falls on every method alike."""
    problem = regime.problem
    data = problem.data()
    times: dict[str, list[float]] = {m: [] for m in lrs}
    for r in range(repeats + 1):
        for method, lr in lrs.items():
            run = run_method(problem, method, lr, regime.batch_size, passes, seed=200 + r, data=data)[0]
            if r:  # the first round warms up
                times[method].append(run.seconds / run.passes[-1])
    return {m: float(np.median(t)) for m, t in times.items()}


def headline(regime: Regime, scores: dict, reference: PredictiveReference, passes: float,
             per_pass: dict[str, float] | None = None) -> tuple[list[str], dict]:
    lines = []
    sgld = {lr: s for (m, lr), s in scores.items() if m == "SGLD"}
    if not sgld:
        return lines, {}
    budgets = np.array(next(iter(scores.values()))["budgets"], dtype=float)
    end = int(np.nonzero(budgets == passes)[0][0]) if passes in budgets else len(budgets) - 1
    best_lr = min(sgld, key=lambda lr: np.nanmean(sgld[lr]["tv"][:, end]))
    target = float(np.nanmean(sgld[best_lr]["tv"][:, end]))
    sgld_secs = float(np.nanmean(sgld[best_lr]["seconds"][:, end]))
    half_tv = reference.meta.get("tv_halves", math.nan)
    if per_pass:
        lines.append("wall s: passes x median seconds per pass (" + ", ".join(
            f"{m} {1e3 * v:.0f} ms" for m, v in per_pass.items()) + "), timed in turn")
    lines.append(f"target: SGLD's TV at {budgets[end]:g} passes, best step h={best_lr:g}: {target:.4f} "
                 f"(seeds {np.round(sgld[best_lr]['tv'][:, end], 4).tolist()}); {sgld_secs:.1f} s. Reference's own "
                 f"TV between halves of its chains: {half_tv:.4f}")
    lines.append(f"{'method':<9}{'best h':>9}{'passes':>8}{'(seeds)':>18}{'x SGLD':>8}{'wall s':>8}{'x SGLD':>8}"
                 f"{'TV@end':>8}{'agree@end':>10}{'noise_ratio':>12}")
    if per_pass:
        sgld_secs = budgets[end] * per_pass["SGLD"]
    summary = {"target_tv": target, "sgld_lr": best_lr, "sgld_seconds": sgld_secs, "reference_tv_halves": half_tv,
               "methods": {}}
    for method in dict.fromkeys(m for m, _ in scores):
        best = None
        for (m, lr), s in scores.items():
            if m != method:
                continue
            b, k = first_budget(budgets, np.nanmean(s["tv"], 0), target)
            if best is None or b < best[0] or (b == best[0] == math.inf and
                                               np.nanmean(s["tv"][:, end]) < np.nanmean(best[2]["tv"][:, end])):
                best = (b, lr, s, k)
        b, lr, s, k = best
        seeds = [first_budget(budgets, s["tv"][i], target)[0] for i in range(s["tv"].shape[0])]
        if k is None:
            secs = math.inf
        elif per_pass:  # passes × the method's median seconds per pass, timed in turn with the others
            secs = b * per_pass[method]
        else:
            secs = float(np.nanmean(s["seconds"][:, k]))
        spread = f"{min(seeds):g}-{max(seeds):g}" if all(map(math.isfinite, seeds)) else \
            ",".join("never" if not math.isfinite(x) else f"{x:g}" for x in seeds)
        lines.append(f"{method:<9}{lr:>9g}{('never' if not math.isfinite(b) else f'{b:g}'):>8}{spread:>18}"
                     f"{b / budgets[end]:>8.2f}{secs:>8.1f}{secs / sgld_secs:>8.2f}"
                     f"{np.nanmean(s['tv'][:, end]):>8.4f}{np.nanmean(s['agreement'][:, end]):>10.4f}"
                     f"{s['noise_ratio']:>12.3g}")
        summary["methods"][method] = dict(lr=lr, passes=b, seed_passes=seeds, seconds=secs,
                                          passes_fraction=b / budgets[end], seconds_fraction=secs / sgld_secs,
                                          tv_end=float(np.nanmean(s["tv"][:, end])),
                                          agreement_end=float(np.nanmean(s["agreement"][:, end])),
                                          noise_ratio=s["noise_ratio"])
    return lines, summary


def full_table(scores: dict, show=(1, 3, 10, 30, 100)) -> list[str]:
    budgets = np.array(next(iter(scores.values()))["budgets"], dtype=float)
    cols = [int(np.argmin(np.abs(budgets - b))) for b in show if b <= budgets[-1]]
    lines = [f"{'method':<9}{'h':>9}" + "".join(f"{'TV@' + format(budgets[c], 'g'):>9}" for c in cols)
             + f"{'agree@end':>10}{'loglik@end':>11}{'acc@end':>8}{'s@end':>7}{'noise_ratio':>12}"]
    for (method, lr), s in sorted(scores.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        tv = np.nanmean(s["tv"], 0)
        lines.append(f"{method:<9}{lr:>9g}" + "".join(f"{tv[c]:>9.4f}" for c in cols)
                     + f"{np.nanmean(s['agreement'][:, -1]):>10.4f}{np.nanmean(s['loglik'][:, -1]):>11.4f}"
                     f"{np.nanmean(s['accuracy'][:, -1]):>8.4f}{np.nanmean(s['seconds'][:, -1]):>7.1f}"
                     f"{s['noise_ratio']:>12.3g}")
    return lines


COLORS = {"SGLD": "tab:blue", "SAGA-LD": "tab:red", "SVRG-LD": "tab:green", "SGLD-CV": "tab:purple"}
STYLES = {"SGLD": "-", "SAGA-LD": "--", "SVRG-LD": "-.", "SGLD-CV": ":"}


def plot(all_scores: dict, summaries: dict, path: Path, wall: bool = False) -> None:
    """TV against data passes per method at its best step, one panel per regime; ``wall=True``: against wall
    seconds (passes × the method's median seconds per pass, timed in turn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(all_scores)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), names):
        scores, summary = all_scores[name], summaries[name]
        for method, info in summary.get("methods", {}).items():
            s = scores[(method, info["lr"])]
            budgets = np.array(s["budgets"], dtype=float)
            if wall:
                per_pass = summary.get("seconds_per_pass")
                if not per_pass:
                    continue
                budgets = budgets * per_pass[method]
            tv = s["tv"]
            ax.plot(budgets, np.nanmean(tv, 0), color=COLORS[method], ls=STYLES[method], lw=2,
                    label=f"{method} (h={info['lr']:g})")
            ax.fill_between(budgets, np.nanmin(tv, 0), np.nanmax(tv, 0), color=COLORS[method], alpha=0.15, lw=0)
        if "target_tv" in summary:
            ax.axhline(summary["target_tv"], color="k", ls="--", lw=1, label="target: SGLD's TV at the end")
            ax.axhline(summary["reference_tv_halves"], color="0.5", ls=":", lw=1,
                       label="reference: TV between its halves")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wall seconds (1 CPU thread)" if wall else "data passes (per-example gradients / N)",
                      fontsize=9)
        ax.set_ylabel("TV to the HMC reference predictive", fontsize=9)
        ax.set_title(REGIMES[name].label(), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Digits BNN: total variation to the reference vs {'wall time' if wall else 'data passes'} "
                 "(each method at its best step; band: seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rounded(obj, digits: int = 5):
    """The report with floats to ``digits`` significant digits (a smaller file, no figure changes)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--passes", type=float, default=100)
    p.add_argument("--diagnostic-passes", type=float, default=10, help="length of the noise_ratio chain")
    p.add_argument("--rerun", action="store_true", help="ignore cached runs")
    p.add_argument("--score-only", action="store_true")
    p.add_argument("--no-timing", action="store_true",
                   help="wall times from the chains themselves, not from separate chains timed in turn")
    p.add_argument("--retime", action="store_true", help="time the methods again even if timings are cached")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
    all_scores, summaries, report = {}, {}, {}
    for name in args.regimes:
        regime = REGIMES[name]
        if not args.score_only:
            print(f"running {regime.label()}", flush=True)
            run_regime(regime, args)
        try:
            reference = load_reference(regime.problem)
        except ValueError as exc:
            print(f"{regime.label()}: not scored ({exc})")
            continue
        scores = score_regime(regime, reference, args.methods)
        if not scores:
            continue
        per_pass = None
        timing = CACHE / regime.name / "seconds_per_pass.json"
        if not args.no_timing:
            _, first = headline(regime, scores, reference, args.passes)
            lrs = {m: v["lr"] for m, v in first["methods"].items()}
            cached = json.loads(timing.read_text()) if timing.exists() and not args.retime else {}
            if cached.get("lrs") != lrs:
                cached = {"lrs": lrs, "seconds_per_pass": seconds_per_pass(regime, lrs),
                          "when": time.strftime("%Y-%m-%d %H:%M")}
                timing.write_text(json.dumps(cached))
            per_pass = cached["seconds_per_pass"]
        lines, summary = headline(regime, scores, reference, args.passes, per_pass)
        summary["seconds_per_pass"] = per_pass
        print(f"\n=== {regime.label()} (mean over {args.seeds} seeds)")
        print("\n".join(full_table(scores)))
        print("\n".join(lines), flush=True)
        all_scores[name], summaries[name] = scores, summary
        report[name] = {"regime": regime.__dict__ | {"steps": list(regime.steps)}, "summary": summary,
                        "runs": {f"{m} h={lr:g}": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                   for k, v in s.items()} for (m, lr), s in scores.items()}}
    if all_scores:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bnn_vr.json").write_text(json.dumps(_rounded(report), default=float))
        plot(all_scores, summaries, RESULTS / "bnn_vr.png")
        plot(all_scores, summaries, RESULTS / "bnn_vr_wall.png", wall=True)
        print(f"\nwritten {RESULTS / 'bnn_vr.json'}, {RESULTS / 'bnn_vr.png'} and {RESULTS / 'bnn_vr_wall.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
