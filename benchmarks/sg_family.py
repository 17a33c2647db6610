"""Cyclical SG-MCMC against SGLD on a 25-mode 2-D Gaussian mixture (issue 17.3; Zhang et al. 2020, Fig. 2).

The modes sit on the grid {-4, -2, 0, 2, 4}², each N(μ_k, 0.25²·I), equal weights; exact gradients, num_data=1,
loss = U. Both samplers make the same number of steps (the same budget) from the same start; a mode counts as
found when a kept draw lies within 3σ = 0.75 of its centre. SGLD: fixed step h = 0.05. cSGLD: Cyclical with
h0 = ``--h0`` (the cosine's peak, 0.12), ``--cycles`` cycles, exploration fraction ``--exploration`` (0 here: with
exact gradients an exploration phase at T = 0 is plain gradient descent into the nearest mode and cannot leave it;
the exploration it is meant for comes from minibatch noise. Measured, 3000 steps, 6 cycles: SGLD 8/25 modes,
cSGLD 25/25 with exploration=0, 3/25 with exploration=0.5).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/sg_family.py modes --out benchmarks/results

prints the modes found by each and writes benchmarks/results/sg_family_modes.png (draws over the mode grid).

Against a peer (issue 17.2): ours against the pip package ``posteriors`` (0.1.3) ``sgmcmc.sgld/sghmc/sgnht``,

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/sg_family.py posteriors

(a) stationary moments on a conjugate Bayesian linear regression (N = 2000, d = 5, known noise, N(0, I) prior),
the same step size, friction and minibatch sequence for both, 4 chains each, pooled means and variances with
batch-means MCSEs. The parametrizations map one to one: posteriors' ``log_posterior`` is the full-data
(unscaled) log posterior N·mean log-lik(batch) + log prior with ``temperature=1``, so its ``lr`` is our ``lr``,
its ``alpha`` our ``friction``, ``beta=0`` both, momenta start at 0 both (posteriors' default draws N(0, 1)),
ξ starts at alpha both. SGLD is the same recursion. SGHMC and SGNHT differ by design in the discretization:
posteriors moves θ with the *old* momentum (explicit Euler; SGNHT's ξ too), ours with the new one
(semi-implicit/symplectic Euler), so their stationary variances differ at O(h); the table shows both against the
exact posterior and against each scheme's own predicted stationary variance (its linear recursion with the
minibatch noise taken at the mode). (b) step time for an MLP 784-512-512-10 at batch 128, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import torch_sample
from torch_sample.schedules import Cyclical

GRID = torch.tensor([[x, y] for x in (-4.0, -2.0, 0.0, 2.0, 4.0) for y in (-4.0, -2.0, 0.0, 2.0, 4.0)])
SD = 0.25


def energy(theta: torch.Tensor) -> torch.Tensor:
    d2 = ((theta[:, None, :] - GRID[None]) ** 2).sum(-1)  # (chains, 25)
    return -torch.logsumexp(-d2 / (2 * SD**2), dim=1).sum()


def run(sampler_fn, steps: int, chains: int, seed: int) -> tuple[torch.Tensor, int]:
    theta = torch.zeros(chains, 2, requires_grad=True)
    sampler = sampler_fn([theta], torch.Generator().manual_seed(seed))
    draws = []
    for _ in range(steps):
        sampler.zero_grad()
        u = energy(theta)
        u.backward()
        sampler.step(loss=u)
        if sampler.stats.get("sampling_phase", 1.0):
            draws.append(theta.detach().clone())
    draws = torch.stack(draws)  # (kept, chains, 2)
    d = ((draws.reshape(-1, 2)[:, None, :] - GRID[None]) ** 2).sum(-1).sqrt()
    found = int((d.min(0).values < 3 * SD).sum())
    return draws, found


def modes(args: argparse.Namespace) -> dict:
    steps = args.steps
    sgld = lambda p, g: torch_sample.SGLD(p, lr=0.05, num_data=1, generator=g)  # noqa: E731
    csgld = lambda p, g: torch_sample.SGLD(p, lr=args.h0, num_data=1, generator=g,  # noqa: E731
                                           schedule=Cyclical(args.cycles, steps, exploration=args.exploration))
    out = {}
    results = {}
    for name, fn in (("SGLD", sgld), ("cSGLD", csgld)):
        draws, found = run(fn, steps, args.chains, args.seed)
        results[name] = draws
        out[name] = {"modes_found": found, "kept_draws": int(draws.shape[0] * draws.shape[1])}
        print(f"{name}: {found}/25 modes found, {out[name]['kept_draws']} kept draws, {steps} steps x {args.chains} "
              "chain(s)")
    if args.out:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
        for ax, (name, draws) in zip(axes, results.items()):
            pts = draws.reshape(-1, 2)[:: max(1, draws.shape[0] * draws.shape[1] // 20000)]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3)
            ax.scatter(GRID[:, 0], GRID[:, 1], marker="x", c="k", s=20)
            ax.set_title(f"{name}: {out[name]['modes_found']}/25 modes ({steps} steps)")
            ax.set_xlim(-6, 6)
            ax.set_ylim(-6, 6)
        fig.tight_layout()
        fig.savefig(directory / "sg_family_modes.png", dpi=100)
        (directory / "sg_family_modes.json").write_text(json.dumps({**out, "args": vars(args)}, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Against a peer: posteriors' sgld / sghmc / sgnht (issue 17, must-show 2)
# ---------------------------------------------------------------------------------------------------------------

def blr_problem(n: int, d: int, seed: int):
    """Conjugate Bayesian linear regression: y = Xβ + ε, ε ~ N(0, 1) known, prior β ~ N(0, I). Correlated
    features (x = z·L, corr 0.5 between neighbours). Returns X, y and the exact posterior mean and covariance."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(0.3 ** (idx[:, None] - idx[None]).abs())
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ chol.T
    beta = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ beta + torch.randn(n, generator=g, dtype=torch.float64)
    prec = x.T @ x + torch.eye(d, dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    return x.float(), y.float(), (cov @ (x.T @ y)), cov


def _batch_means(series: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """series (chains, T, d) -> pooled mean and its MCSE by batch means (nb batches per chain)."""
    c, t, d = series.shape
    m = t // nb
    means = series[:, : nb * m].reshape(c, nb, m, d).mean(2).reshape(c * nb, d)
    return means.mean(0), means.std(0) / math.sqrt(c * nb)


def predicted_variance(scheme: str, h: float, a: float, prec: torch.Tensor, grad_cov: torch.Tensor,
                       iters: int = 200_000) -> torch.Tensor:
    """Stationary Var(θ) of the discretized chain on the Gaussian posterior, the minibatch gradient modelled as
    the exact gradient plus independent noise of covariance ``grad_cov`` (its covariance at the posterior mean):
    the fixed point of Σ = AΣAᵀ + Q for each scheme's linear recursion. ``a``: the friction (SGNHT: the
    thermostat's stationary value, found by the caller)."""
    d = prec.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    zero = torch.zeros(d, d, dtype=torch.float64)
    if scheme == "sgld":
        amat, q = eye - h * prec, 2 * h * eye + h * h * grad_cov
    else:
        qr = 2 * a * h * eye + h * h * grad_cov
        if scheme == "ours":  # r' = (1-hα) r - hΛθ + n ; θ' = θ + h r'
            amat = torch.cat([torch.cat([eye - h * h * prec, h * (1 - h * a) * eye], 1),
                              torch.cat([-h * prec, (1 - h * a) * eye], 1)])
            lift = torch.cat([h * eye, eye])
        else:  # posteriors: θ' = θ + h r ; r' = (1-hα) r - hΛθ + n
            amat = torch.cat([torch.cat([eye, h * eye], 1), torch.cat([-h * prec, (1 - h * a) * eye], 1)])
            lift = torch.cat([zero, eye])
        q = lift @ qr @ lift.T
    sigma = q.clone()
    power = amat.clone()
    for _ in range(60):  # doubling: Σ_{2k} = Σ_k + A^k Σ_k A^kᵀ
        sigma = sigma + power @ sigma @ power.T
        power = power @ power
        if float(power.abs().max()) < 1e-30:
            break
    return sigma


def _exact_lin(scheme, h, a, prec, grad_cov):
    s = predicted_variance(scheme, h, a, prec, grad_cov)
    d = prec.shape[0]
    return s[:d, :d].diagonal(), (s[d:, d:].diagonal().mean() if scheme != "sgld" else None)


def _thermostat(scheme, h, a, prec, grad_cov):
    """SGNHT's stationary ξ: the friction at which the chain's mean squared momentum is T = 1 (bisection)."""
    lo, hi = 1e-6, 1.0 / h
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        try:
            _, msq = _exact_lin(scheme, h, mid, prec, grad_cov)
            hot = not math.isfinite(float(msq)) or float(msq) > 1.0
        except RuntimeError:
            hot = True
        lo, hi = (mid, hi) if hot else (lo, mid)
    return 0.5 * (lo + hi)


def _ours_chain(kind, theta0, x, y, batches, h, alpha, seed):
    theta = theta0.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    prior = torch_sample.priors.Normal(1.0)
    n = x.shape[0]
    if kind == "SGLD":
        s = torch_sample.SGLD([theta], lr=h, num_data=n, prior=prior, generator=gen)
    elif kind == "SGHMC":
        s = torch_sample.SGHMC([theta], lr=h, num_data=n, friction=alpha, prior=prior, generator=gen)
    else:
        s = torch_sample.SGNHT([theta], lr=h, num_data=n, friction=alpha, prior=prior, generator=gen)
    s.noise_ratio_every = 0
    out = torch.empty(len(batches), theta.numel())
    for t, idx in enumerate(batches):
        s.zero_grad()
        loss = 0.5 * (y[idx] - x[idx] @ theta).pow(2).mean()
        loss.backward()
        s.step(loss=loss)
        out[t] = theta.detach()
    return out


def _theirs_chain(kind, theta0, x, y, batches, h, alpha, seed):
    import posteriors

    n = x.shape[0]

    def log_post(theta, batch):
        xb, yb = batch
        return -n * 0.5 * (yb - xb @ theta).pow(2).mean() - 0.5 * (theta * theta).sum(), torch.tensor([])

    torch.manual_seed(seed)
    if kind == "SGLD":
        tr = posteriors.sgmcmc.sgld.build(log_post, lr=h)
    elif kind == "SGHMC":
        tr = posteriors.sgmcmc.sghmc.build(log_post, lr=h, alpha=alpha, momenta=0.0)
    else:
        tr = posteriors.sgmcmc.sgnht.build(log_post, lr=h, alpha=alpha, momenta=0.0)
    state = tr.init(theta0.clone())
    out = torch.empty(len(batches), theta0.numel())
    for t, idx in enumerate(batches):
        state, _ = tr.update(state, (x[idx], y[idx]), inplace=True)
        out[t] = state.params
    return out


def moments(args: argparse.Namespace) -> dict:
    x, y, post_mean, post_cov = blr_problem(args.n, args.d, args.seed)
    n, d, b = args.n, args.d, args.batch
    prec = torch.linalg.inv(post_cov)
    # the minibatch gradient's covariance at the posterior mean (sampling without replacement)
    g = x.double() * (y.double() - x.double() @ post_mean)[:, None]
    grad_cov = n * n / b * (1 - b / n) * torch.cov(g.T, correction=1)
    configs = {"SGLD": (args.h_sgld, 0.0), "SGHMC": (args.h_hmc, args.friction),
               "SGNHT": (args.h_hmc, args.friction_nht)}
    rows, out = [], {}
    burn = args.steps // 4
    for kind, (h, alpha) in configs.items():
        draws = {"ours": [], "theirs": []}
        for c in range(args.chains):
            gb = torch.Generator().manual_seed(1000 + c)
            batches = [torch.randperm(n, generator=gb)[:b] for _ in range(args.steps)]
            theta0 = post_mean.float() + post_cov.diagonal().sqrt().float() * torch.randn(d, generator=gb)
            draws["ours"].append(_ours_chain(kind, theta0, x, y, batches, h, alpha, 10 * c + 1))
            draws["theirs"].append(_theirs_chain(kind, theta0, x, y, batches, h, alpha, 10 * c + 2))
        stats = {}
        for who, ds in draws.items():
            s = torch.stack(ds)[:, burn:].double()
            m, m_se = _batch_means(s, args.nb)
            v, v_se = _batch_means((s - m) ** 2, args.nb)
            stats[who] = (m, m_se, v, v_se)
        if kind == "SGLD":
            pred = {w: _exact_lin("sgld", h, 0.0, prec, grad_cov)[0] for w in ("ours", "theirs")}
        elif kind == "SGHMC":
            pred = {"ours": _exact_lin("ours", h, alpha, prec, grad_cov)[0],
                    "theirs": _exact_lin("theirs", h, alpha, prec, grad_cov)[0]}
        else:
            pred = {w: _exact_lin(w, h, _thermostat(w, h, alpha, prec, grad_cov), prec, grad_cov)[0]
                    for w in ("ours", "theirs")}
        res = {"h": h, "friction": alpha, "coords": []}
        for j in range(d):
            mo, mose, vo, vose = (t[j].item() for t in stats["ours"])
            mt, mtse, vt, vtse = (t[j].item() for t in stats["theirs"])
            zm = (mo - mt) / math.hypot(mose, mtse)
            zv = (vo - vt) / math.hypot(vose, vtse)
            res["coords"].append(dict(mean_ours=mo, mean_ours_se=mose, mean_theirs=mt, mean_theirs_se=mtse,
                                      var_ours=vo, var_ours_se=vose, var_theirs=vt, var_theirs_se=vtse,
                                      z_mean=zm, z_var=zv, mean_exact=post_mean[j].item(),
                                      var_exact=post_cov[j, j].item(), var_pred_ours=pred["ours"][j].item(),
                                      var_pred_theirs=pred["theirs"][j].item()))
            rows.append(f"{kind:6s} {j:2d} {post_mean[j].item():+9.5f} {mo:+9.5f}±{mose:.5f} {mt:+9.5f}±{mtse:.5f} "
                        f"{zm:+5.1f} | {1e4 * post_cov[j, j].item():7.3f} {1e4 * vo:7.3f}±{1e4 * vose:5.3f} "
                        f"{1e4 * vt:7.3f}±{1e4 * vtse:5.3f} {zv:+5.1f} | {1e4 * pred['ours'][j].item():7.3f} "
                        f"{1e4 * pred['theirs'][j].item():7.3f}")
        res["agree_4mcse"] = all(abs(r["z_mean"]) < 4 and abs(r["z_var"]) < 4 for r in res["coords"])
        out[kind] = res
    print(f"BLR N={n} d={d} (feature corr 0.3^|i-j|), batch {b}, {args.chains} chains x {args.steps} steps "
          f"(first {burn} dropped), SGLD h={args.h_sgld:g}; SGHMC/SGNHT h={args.h_hmc:g}, friction {args.friction:g} "
          f"/ {args.friction_nht:g}"
          f"; MCSE by batch means ({args.nb} per chain); variances x1e4; z = (ours - theirs)/combined MCSE; "
          "pred = the stationary variance of each scheme's linear recursion with the minibatch noise at the mode")
    print(f"{'method':6s} {'j':>2s} {'exact':>9s} {'mean ours':>17s} {'mean theirs':>17s} {'z':>5s} | "
          f"{'exact':>7s} {'var ours':>13s} {'var theirs':>13s} {'z':>5s} | {'pred us':>7s} {'pred them':>7s}")
    for r in rows:
        print(r)
    for kind, res in out.items():
        print(f"{kind}: ours and posteriors agree within 4 combined MCSE on every mean and variance: "
              f"{'yes' if res['agree_4mcse'] else 'NO'}")
    return out


def timing(args: argparse.Namespace) -> dict:
    import statistics
    import time

    import posteriors
    from torch import nn
    from torch.func import functional_call

    torch.set_num_threads(1)
    n, b = 10_000, 128
    g = torch.Generator().manual_seed(0)
    data_x = torch.randn(n, 784, generator=g)
    data_y = torch.randint(0, 10, (n,), generator=g)
    batches = [torch.randint(0, n, (b,), generator=g) for _ in range(args.warmup + args.timing_steps)]
    batches = [(data_x[i], data_y[i]) for i in batches]

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def ours(kind):
        model = make_model()
        cls = getattr(torch_sample, kind)
        kw = {} if kind == "SGLD" else {"friction": 1.0}
        s = cls(model.parameters(), lr=1e-6, num_data=n, prior=torch_sample.priors.Normal(1.0), **kw)
        s.noise_ratio_every = 0

        def step(batch):
            xb, yb = batch
            s.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            s.step(loss=loss)
        return step

    def theirs(kind):
        model = make_model()
        params = {k: v.detach() for k, v in model.named_parameters()}

        def log_post(p, batch):
            xb, yb = batch
            logits = functional_call(model, p, (xb,))
            lp = -n * nn.functional.cross_entropy(logits, yb)
            return lp - 0.5 * sum((v * v).sum() for v in p.values()), torch.tensor([])

        mod = getattr(posteriors.sgmcmc, kind.lower())
        kw = {} if kind == "SGLD" else {"alpha": 1.0}
        tr = mod.build(log_post, lr=1e-6, **kw)
        state = tr.init(params)

        def step(batch):
            nonlocal state
            state, _ = tr.update(state, batch, inplace=True)
        return step

    kinds = ("SGLD", "SGHMC", "SGNHT")
    times = {(k, w): [] for k in kinds for w in ("ours", "theirs")}
    for _ in range(args.rounds):
        for k in kinds:
            for who, make in (("ours", ours), ("theirs", theirs)):
                step = make(k)
                for batch in batches[: args.warmup]:
                    step(batch)
                ts = []
                for batch in batches[args.warmup:]:
                    t0 = time.perf_counter()
                    step(batch)
                    ts.append(time.perf_counter() - t0)
                times[(k, who)].append(statistics.median(ts))
    print(f"MLP 784-512-512-10, batch {b}, N={n} random data, 1 thread; median of {args.timing_steps} steps after "
          f"{args.warmup} warm-up, methods in turn, {args.rounds} rounds (ms per round; ratio of the medians over "
          "rounds); ours without an engine, noise_ratio_every=0; posteriors with inplace=True")
    print(f"{'method':6s} {'ours ms (rounds)':>28s} {'posteriors ms (rounds)':>28s} {'ours/theirs':>11s}")
    out = {}
    for k in kinds:
        o, t = times[(k, "ours")], times[(k, "theirs")]
        ratio = statistics.median(o) / statistics.median(t)
        out[k] = {"ours_ms": [1e3 * v for v in o], "theirs_ms": [1e3 * v for v in t], "ratio": ratio}
        fo = " ".join(f"{1e3 * v:6.2f}" for v in o)
        ft = " ".join(f"{1e3 * v:6.2f}" for v in t)
        print(f"{k:6s} {fo:>28s} {ft:>28s} {ratio:11.2f}")
    return out


def peer(args: argparse.Namespace) -> dict:
    out = {}
    if not args.skip_moments:
        out["moments"] = moments(args)
    if not args.skip_timing:
        out["timing"] = timing(args)
    if args.out:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "sg_family_posteriors.json").write_text(json.dumps({**out, "args": vars(args)}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("modes", help="cSGLD vs SGLD on the 25-mode mixture")
    m.add_argument("--steps", type=int, default=3000)
    m.add_argument("--chains", type=int, default=1)
    m.add_argument("--cycles", type=int, default=6)
    m.add_argument("--exploration", type=float, default=0.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--h0", type=float, default=0.12)
    m.add_argument("--out", default="")
    p = sub.add_parser("posteriors", help="ours against posteriors' sgld/sghmc/sgnht: moments and step time")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--d", type=int, default=5)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--steps", type=int, default=16_000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--nb", type=int, default=20, help="batch-means batches per chain")
    p.add_argument("--h-sgld", type=float, default=5e-5)
    p.add_argument("--h-hmc", type=float, default=1e-3)
    p.add_argument("--friction", type=float, default=20.0, help="SGHMC's α (posteriors' alpha)")
    p.add_argument("--friction-nht", type=float, default=6.0, help="SGNHT's A (posteriors' alpha, ξ's start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timing-steps", dest="timing_steps", type=int, default=50)
    p.add_argument("--skip-moments", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--out", default="")
    args = parser.parse_args()
    if args.what == "modes":
        modes(args)
    elif args.what == "posteriors":
        peer(args)


if __name__ == "__main__":
    main()
