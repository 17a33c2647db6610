"""A gold-standard posterior predictive for the digits BNN by long full-batch HMC (issue 12).

    python benchmarks/bnn_reference.py                      # T = 1, N = 1347 (the demo's posterior)
    python benchmarks/bnn_reference.py --temperature 0.1    # the cold posterior
    python benchmarks/bnn_reference.py --num-train 300      # a subsample of the training set

The project's own samplers: `torch_sample.HMC` on a flat θ with `log_density_closure(..., compile=True)`,
Stan-windowed diagonal mass matrix and dual averaging to 0.8 during warmup, step-size jitter 0.2,
several independent chains from the default initialization of `nn.Linear`. Each kept draw's test
class probabilities are averaged per chain; the reference predictive is the mean over chains.

Its own validity, in predictive space (the posterior has symmetric modes): the total variation between
the predictives of the first and second half of the chains (reported, and compared by
``benchmarks/bnn_vr.py`` with the smallest TV an SG sampler reaches), and R-hat / bulk ESS of each
draw's mean test log-likelihood. Writes ``vr_mcmc/references/<name>.npz`` (about 65 kB: the mean and
each chain's predictive, 16-bit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import torch_sample
from vr_mcmc.digits import DigitsBNN
from vr_mcmc.predictive import PredictiveReference, predictive_scores, total_variation

OUT = Path(__file__).resolve().parents[1] / "vr_mcmc" / "references"


def run_chain(problem: DigitsBNN, chain: int, args, data) -> tuple[np.ndarray, dict]:
    x, y, xt, _yt = data
    torch.manual_seed(1000 + chain)
    theta = problem.flatten(problem.model()).clone().requires_grad_(True)
    sampler = torch_sample.HMC([theta], lr=args.step_size, num_leapfrog=args.leapfrog, jitter=0.2,
                               temperature=problem.temperature,
                               generator=torch.Generator().manual_seed(2000 + chain))
    closure = torch_sample.log_density_closure(problem.log_density(x, y), theta, compile=not args.eager)
    sampler.adapt(True, num_warmup=args.warmup)
    probs, accept, diverging = [], [], 0
    t0 = time.perf_counter()
    for it in range(args.warmup + args.draws * args.thin):
        if it == args.warmup:
            sampler.adapt(False)
        sampler.step(closure)
        if it >= args.warmup:
            accept.append(sampler.stats["acceptance_rate"])
            diverging += int(sampler.stats["diverging"])
            if (it - args.warmup + 1) % args.thin == 0:
                with torch.no_grad():
                    probs.append(torch.softmax(problem.logits(theta.detach(), xt), -1).numpy())
    info = dict(seconds=time.perf_counter() - t0, step_size=sampler.step_size, accept=float(np.mean(accept)),
                divergences=diverging)
    return np.stack(probs), info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-train", type=int, default=1347)
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--draws", type=int, default=1000, help="kept draws per chain")
    p.add_argument("--thin", type=int, default=1)
    p.add_argument("--leapfrog", type=int, default=32)
    p.add_argument("--step-size", type=float, default=0.01, help="initial step size (adapted during warmup)")
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--out", default=None, help=f"output file (default {OUT}/<name>.npz)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    problem = DigitsBNN(temperature=args.temperature, num_train=args.num_train)
    data = problem.data()
    t0 = time.perf_counter()
    draws, infos = [], []
    for c in range(args.chains):
        d, info = run_chain(problem, c, args, data)
        draws.append(d)
        infos.append(info)
        print(f"chain {c}: {info['seconds']:.0f} s, step {info['step_size']:.4g}, accept {info['accept']:.3f}, "
              f"divergences {info['divergences']}", flush=True)
    seconds = time.perf_counter() - t0
    draws = np.stack(draws)  # [chain, draw, points, classes]
    labels = data[3].numpy()
    chain_probs = draws.mean(1)
    probs = chain_probs.mean(0)
    half = args.chains // 2
    tv_halves = float(total_variation(chain_probs[:half].mean(0), chain_probs[half:].mean(0)))
    tv_chains = total_variation(chain_probs, probs)
    import arviz as az

    ll = predictive_scores(draws, labels)["loglik"]  # per draw: mean test log-likelihood of that draw alone
    rhat, ess = float(az.rhat(ll)), float(az.ess(ll, method="bulk"))
    scores = predictive_scores(probs, labels)
    meta = dict(name=problem.name, problem=problem.as_dict(), sampler="torch_sample.HMC (compiled closure)",
                chains=args.chains, warmup=args.warmup, draws_per_chain=args.draws, thin=args.thin,
                num_leapfrog=args.leapfrog, jitter=0.2, seconds=round(seconds, 1),
                command="python benchmarks/bnn_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                step_sizes=[i["step_size"] for i in infos], accept=[i["accept"] for i in infos],
                divergences=sum(i["divergences"] for i in infos), tv_halves=tv_halves,
                tv_chain_vs_all=[float(t) for t in tv_chains], rhat_test_loglik=rhat, ess_bulk_test_loglik=ess,
                test_loglik=float(scores["loglik"]), test_accuracy=float(scores["accuracy"]))
    out = Path(args.out) if args.out else OUT / f"{problem.name}.npz"
    PredictiveReference(probs, chain_probs, labels, meta).save(out)
    print(f"{problem.name}: {seconds:.0f} s; predictive test loglik {meta['test_loglik']:.4f}, accuracy "
          f"{meta['test_accuracy']:.4f}; TV(first half of chains, second half) {tv_halves:.4f}; "
          f"TV(chain, all) {np.round(tv_chains, 4).tolist()}; R-hat {rhat:.3f}, bulk ESS {ess:.0f} of the per-draw "
          f"test log-likelihood; written {out} ({out.stat().st_size / 1e3:.1f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
