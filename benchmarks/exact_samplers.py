"""Our HMC against Pyro's: effective samples per second and per gradient evaluation (issue #5).

Same algorithm, same settings: HMC with a fixed step size ε, a fixed number L of leapfrog steps and the same diagonal
inverse mass matrix M⁻¹, no adaptation during sampling, from the same starting points, on posteriordb reference
posteriors (``tests/refposteriors.py``; data in ``tests/data/refposteriors`` or ``$VR_MCMC_REFPOSTERIORS``). Float64,
CPU, one thread (``torch.set_num_threads(1)``).

- Settings per posterior: one warmup run of our HMC with adaptation on (``adapt(True, num_warmup=--warmup)``,
  dual averaging to acceptance 0.8 and Stan's windowed diagonal mass matrix) from a draw of the reference, then ε =
  the adapted step size, M⁻¹ = the adapted diagonal, and L = round(``--trajectory`` / ε) (``--trajectory`` is the
  integration time ε·L in the units of the adapted metric; 1.5 ≈ a quarter period of a unit Gaussian), at most
  ``--max-leapfrog``.
- Chains: ``--chains`` chains of ``--draws`` draws each per sampler, chain c from the same start (a random draw of
  the reference) for every sampler. The samplers run interleaved (chain 1 of each, then chain 2 of each, ...) so
  that a shared machine's load hits them alike.
- Samplers, all on the same log density function (the posterior's math with its data bound):
  ``ours``           ``torch_sample.HMC`` with ``log_density_closure(log_density, θ)`` (eager autograd),
  ``ours compiled``  the same with ``log_density_closure(..., compile=True)``: U and ∇U by torch.compile of
                     ``torch.func.grad_and_value`` (compiled before the clock starts),
  ``pyro``           ``pyro.infer.mcmc.HMC(potential_fn=...)`` run by ``pyro.infer.MCMC`` (``warmup_steps=0``),
                     inverse mass matrix set to the same diagonal after the kernel's setup,
  ``pyro jit``       Pyro's own compilation: the density as a Pyro model (θ ~ ImproperUniform, ``pyro.factor``)
                     with ``jit_compile=True`` (a torch.jit trace of the potential; ``potential_fn`` kernels are
                     never compiled by Pyro).
- ESS: arviz bulk ESS over the chains of each parameter of the reference draws (constrained scale, e.g. tau and
  theta[j] for eight schools); min and median over the parameters. Time: the sampling wall time summed over the
  chains (setup and compilation excluded). Gradient evaluations: counted calls of the closure / the potential during
  sampling (ours: L per iteration plus one at the start of each chain, as ``stats["grad_evals"]`` + 1; Pyro's: L per
  iteration, its evaluation at the start is in its setup). Acceptance: the fraction of iterations that moved.
  max|Δmean|/sd: the largest error of the posterior mean over the parameters, in reference sds, against the 10,000
  reference draws (Monte Carlo error alone is about 1/√ESS).
- Same random numbers: chain c of every sampler uses seed c (ours: ``generator=torch.Generator().manual_seed(c)``,
  Pyro: ``pyro.set_rng_seed(c)``). Both draw the momentum ξ ~ N(0, I) (r = M^½ξ) and then one float64 uniform per
  iteration, accepting if u < min(1, exp(−ΔH)), so the chains coincide up to floating-point rounding as long as
  rounding does not flip an accept decision: the column "draws = Pyro's" is the fraction of draws within 1e-8 of
  Pyro's (then ESS per gradient evaluation is equal by construction, and the ESS/s ratio is the speed ratio).
- Targets (issue #5): equal ESS per gradient evaluation (the same algorithm), and ≥ 3× Pyro's ESS per second.

Run: ``python benchmarks/exact_samplers.py`` (needs Pyro: ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from refposteriors import POSTERIORS, unavailable_reason

import torch_sample

DEFAULT_POSTERIORS = ("eight_schools-eight_schools_noncentered", "earnings-logearn_interaction_z", "garch-garch11")
SAMPLERS = ("ours", "ours compiled", "pyro", "pyro jit")


def log_density_of(post):
    """θ -> log π(θ) with the data bound once (the public ``post.log_density`` also checks shapes and looks the
    cached data up on every call; the same function goes to every sampler)."""
    data = post.data()
    fn = post._log_density

    def log_density(theta):
        return fn(theta, data)

    return log_density


def settings(closure, theta, start, args):
    """(ε, L, M⁻¹ diagonal) from a warmup run of our HMC with adaptation."""
    with torch.no_grad():
        theta.copy_(start)
    sampler = torch_sample.HMC([theta], lr=0.1, num_leapfrog=args.warmup_leapfrog,
                               generator=torch.Generator().manual_seed(args.seed + 999))
    sampler.adapt(True, num_warmup=args.warmup)
    for _ in range(args.warmup):
        sampler.step(closure)
    sampler.adapt(False)
    eps = sampler.step_size
    inv_mass = sampler.state[theta]["inv_mass"].detach().clone()
    L = min(max(1, round(args.trajectory / eps)), args.max_leapfrog)
    return eps, L, inv_mass


def counting(closure):
    """``closure`` wrapped to count its calls, and the counter (a one-element list)."""
    calls = [0]

    def counted():
        calls[0] += 1
        return closure()

    return counted, calls


def run_ours(closure, theta, start, eps, L, inv_mass, draws, seed):
    counted, calls = counting(closure)

    with torch.no_grad():
        theta.copy_(start)
    sampler = torch_sample.HMC([theta], lr=eps, num_leapfrog=L, generator=torch.Generator().manual_seed(seed))
    sampler.state[theta]["inv_mass"] = inv_mass.clone()
    out = torch.empty(draws, theta.numel(), dtype=theta.dtype)
    grad_evals_stat = 0.0
    t0 = time.perf_counter()
    for i in range(draws):
        sampler.step(counted)
        out[i] = theta.detach()
        grad_evals_stat += sampler.stats["grad_evals"]
    elapsed = time.perf_counter() - t0
    return out, elapsed, calls[0], grad_evals_stat


def pyro_kernel_class():
    from pyro.infer.mcmc import HMC as PyroHMC

    class FixedMassHMC(PyroHMC):
        """Pyro's HMC with a given diagonal inverse mass matrix, counted potential calls and the end of setup timed.

        ``setup`` (called by MCMC.run) configures the adapter, which resets the mass matrix to I: set ours after it.
        """

        def __init__(self, *args, inv_mass, **kwargs):
            super().__init__(*args, **kwargs)
            self._fixed_inv_mass = inv_mass
            self.calls = 0
            self.setup_done = None

        def setup(self, warmup_steps, *args, **kwargs):
            super().setup(warmup_steps, *args, **kwargs)
            (sites,) = self.mass_matrix_adapter.inverse_mass_matrix  # one block: ("theta",)
            self.mass_matrix_adapter.inverse_mass_matrix = {sites: self._fixed_inv_mass.clone()}
            potential_fn = self.potential_fn

            def counted(z):
                self.calls += 1
                return potential_fn(z)

            self.potential_fn = counted
            self.setup_done = time.perf_counter()

    return FixedMassHMC


def run_pyro(log_density, start, eps, L, inv_mass, draws, seed, jit):
    import pyro
    import pyro.distributions as dist
    from pyro.distributions import constraints
    from pyro.infer import MCMC
    from pyro.infer.autoguide.initialization import init_to_value

    pyro.set_rng_seed(seed)
    kernel_cls = pyro_kernel_class()
    common = dict(step_size=eps, num_steps=L, adapt_step_size=False, adapt_mass_matrix=False, inv_mass=inv_mass)
    if jit:
        dim = start.numel()

        def model():
            theta = pyro.sample("theta", dist.ImproperUniform(constraints.real, (), (dim,)))
            pyro.factor("log_density", log_density(theta))

        kernel = kernel_cls(model=model, jit_compile=True, ignore_jit_warnings=True, max_plate_nesting=0,
                            init_strategy=init_to_value(values={"theta": start.clone()}), **common)
    else:
        kernel = kernel_cls(potential_fn=lambda z: -log_density(z["theta"]), **common)
    if kernel.num_steps != L:  # num_steps is int(trajectory_length / step_size): guard against rounding down
        kernel.trajectory_length = eps * (L + 0.5)
    assert kernel.num_steps == L
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=0, initial_params={"theta": start.clone()},
                disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run()
    elapsed = time.perf_counter() - kernel.setup_done
    out = mcmc.get_samples()["theta"].detach().reshape(draws, -1)
    return out, elapsed, kernel.calls, float(draws * L)


def summarize(post, chains_theta, starts):
    """ESS (bulk, per reference parameter), acceptance (fraction of moves), max |Δmean|/sd against the reference."""
    import arviz as az

    theta = torch.stack(chains_theta)  # [chains, draws, dim]
    params = post.to_params(theta)
    ref = post.reference()
    ess = []
    err = []
    for name in post.param_names:
        x = params[name].numpy()
        ess.append(float(az.ess(x, method="bulk")))
        r = ref[name]
        err.append(abs(x.mean() - r.mean()) / r.std())
    prev = torch.cat([torch.stack(starts)[:, None], theta[:, :-1]], 1)
    moved = (theta != prev).any(-1).double().mean().item()
    return np.array(ess), moved, max(err)


def density_and_starts(post, args):
    """The posterior's log density and chains + 1 starting points drawn from its reference draws (seeded): one
    for the closures, one per chain."""
    gen = torch.Generator().manual_seed(args.seed)
    ref_theta = post.reference_unconstrained()
    pick = torch.randint(ref_theta.shape[1], (args.chains + 1,), generator=gen)
    return log_density_of(post), [ref_theta[c % ref_theta.shape[0], pick[c]].clone() for c in range(args.chains + 1)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=1000, help="draws per chain and sampler")
    parser.add_argument("--posteriors", default=",".join(DEFAULT_POSTERIORS),
                        help=f"comma-separated names from: {', '.join(POSTERIORS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1000, help="adaptation steps that choose ε and M⁻¹")
    parser.add_argument("--warmup-leapfrog", type=int, default=8, help="L during the adaptation run")
    parser.add_argument("--trajectory", type=float, default=1.5, help="integration time ε·L (adapted metric)")
    parser.add_argument("--max-leapfrog", type=int, default=100,
                        help="cap on L (a too short warmup can leave a tiny ε)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated, from: {', '.join(SAMPLERS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nuts", action="store_true",
                        help="NUTS instead: ours against Pyro's and NumPyro's, each with its own adaptation "
                             f"(samplers from: {', '.join(NUTS_SAMPLERS)}; default all)")
    args = parser.parse_args(argv)
    if args.nuts and args.threads == 1:  # JAX on one CPU thread too, like torch (before jax is imported)
        import os

        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

    try:
        import pyro
    except ImportError:
        sys.exit("Pyro is not installed: pip install -e \".[bench]\" (or pip install pyro-ppl)")
    if unavailable_reason():
        sys.exit(unavailable_reason())
    names = [n.strip() for n in args.posteriors.split(",") if n.strip()]
    unknown = [n for n in names if n not in POSTERIORS]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if args.nuts and args.samplers == ",".join(SAMPLERS):
        samplers = list(NUTS_SAMPLERS)
    if unknown or not set(samplers) <= set(NUTS_SAMPLERS if args.nuts else SAMPLERS):
        sys.exit(f"unknown posterior(s) {unknown} or sampler(s) {sorted(set(samplers) - set(SAMPLERS))}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} thread(s); "
          f"{args.chains} chains x {args.draws} draws per sampler; seed {args.seed}", flush=True)

    if args.nuts:
        return nuts_main(args, names, samplers)
    rows = []
    for name in names:
        post = POSTERIORS[name]
        log_density, starts = density_and_starts(post, args)
        theta = starts[0].clone().requires_grad_(True)
        eager = torch_sample.log_density_closure(log_density, theta)
        closures = {"ours": eager}
        t0 = time.perf_counter()
        if "ours compiled" in samplers:
            compiled = torch_sample.log_density_closure(log_density, theta, compile=True)
            closures["ours compiled"] = compiled
            # the compiled U and ∇U against eager autograd, at the start (this call also compiles)
            theta.grad = None
            u_c = compiled()
            g_c = theta.grad.clone()
            theta.grad = None
            u_e = eager()
            torch.testing.assert_close(u_c, u_e, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(g_c, theta.grad, rtol=1e-9, atol=1e-9)
        compile_s = time.perf_counter() - t0
        eps, L, inv_mass = settings(closures.get("ours compiled", eager), theta, starts[-1], args)
        print(f"\n{name} (dim {post.dim}): ε = {eps:.4g}, L = {L}, M⁻¹ diagonal in [{inv_mass.min():.3g}, "
              f"{inv_mass.max():.3g}] (compile {compile_s:.1f} s)", flush=True)
        results = {s: {"draws": [], "time": 0.0, "calls": 0, "stat_evals": 0.0} for s in samplers}
        for c in range(args.chains):
            seed = args.seed * 1000 + c
            for s in samplers:
                if s.startswith("ours"):
                    out, t, calls, stat = run_ours(closures[s], theta, starts[c], eps, L, inv_mass, args.draws, seed)
                else:
                    out, t, calls, stat = run_pyro(log_density, starts[c], eps, L, inv_mass, args.draws, seed,
                                                   jit=(s == "pyro jit"))
                r = results[s]
                r["draws"].append(out.to(torch.float64))
                r["time"] += t
                r["calls"] += calls
                r["stat_evals"] += stat
        for s in samplers:
            r = results[s]
            ess, moved, err = summarize(post, r["draws"], starts[: args.chains])
            expected = args.chains * args.draws * L + (args.chains if s.startswith("ours") else 0)  # + ours' first U
            if r["calls"] != expected or r["stat_evals"] != args.chains * args.draws * L:
                print(f"  note: {s}: {r['calls']} gradient evaluations counted, {r['stat_evals']:.0f} by the sampler, "
                      f"{expected} expected")
            same = float("nan")
            if s != "pyro" and "pyro" in samplers:  # same seeds: the same chains, up to rounding
                diff = torch.stack(r["draws"]) - torch.stack(results["pyro"]["draws"])
                same = (diff.abs().amax(-1) < 1e-8).double().mean().item()
            rows.append(dict(posterior=name, sampler=s, eps=eps, L=L, accept=moved, ess_min=ess.min(),
                             ess_med=float(np.median(ess)), time=r["time"], evals=r["calls"], err=err, same=same))
            print(f"  {s:<14} accept {moved:.3f}  ESS min {ess.min():7.0f}  median {np.median(ess):7.0f}  "
                  f"time {r['time']:7.2f} s  grad evals {r['calls']}", flush=True)
    print_table(rows, samplers)


def print_table(rows, samplers):
    print("\n| posterior | sampler | ε | L | accept | ESS min | ESS median | time (s) | ESS/s (min) | ESS/s (median) "
          "| ESS (min) per 1000 grad evals | max\\|Δmean\\|/sd | draws = Pyro's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = "-" if math.isnan(r["same"]) else f"{100 * r['same']:.0f}%"
        print(f"| {r['posterior']} | {r['sampler']} | {r['eps']:.4g} | {r['L']} | {r['accept']:.3f} "
              f"| {r['ess_min']:.0f} | {r['ess_med']:.0f} | {r['time']:.2f} | {r['ess_min'] / r['time']:.1f} "
              f"| {r['ess_med'] / r['time']:.1f} | {1000 * r['ess_min'] / r['evals']:.1f} | {r['err']:.3f} "
              f"| {same} |")
    pairs = [(a, b) for a, b in [("ours", "pyro"), ("ours compiled", "pyro"), ("ours compiled", "pyro jit"),
                                 ("ours", "pyro jit")] if a in samplers and b in samplers]
    if not pairs:
        return
    print("\nRatios (ESS/s by min ESS, by median ESS; ESS per gradient evaluation by min ESS, by median ESS):\n")
    print("| posterior | ours / pyro | ESS/s (min) | ESS/s (median) | ESS/grad (min) | ESS/grad (median) |")
    print("|---|---|---|---|---|---|")
    by = {(r["posterior"], r["sampler"]): r for r in rows}
    for name in dict.fromkeys(r["posterior"] for r in rows):
        for a, b in pairs:
            x, y = by[(name, a)], by[(name, b)]
            per_s = [(x[k] / x["time"]) / (y[k] / y["time"]) for k in ("ess_min", "ess_med")]
            per_g = [(x[k] / x["evals"]) / (y[k] / y["evals"]) for k in ("ess_min", "ess_med")]
            print(f"| {name} | {a} / {b} | {per_s[0]:.2f}x | {per_s[1]:.2f}x | {per_g[0]:.2f} | {per_g[1]:.2f} |")
    return


# -- NUTS against Pyro's and NumPyro's (issue 18) ---------------------------------------------------------------------

NUTS_SAMPLERS = ("ours", "ours compiled", "pyro", "numpyro")


def jax_log_density(post, data):
    """The posterior's log density in JAX (for NumPyro), the same math as ``tests/refposteriors.py``."""
    import jax.numpy as jnp
    from jax.nn import log_sigmoid, sigmoid

    d = {k: np.asarray(v) for k, v in data.items()}
    log_2pi = math.log(2 * math.pi)

    def normal_lpdf(x, loc, scale):
        return -0.5 * log_2pi - jnp.log(scale) - 0.5 * ((x - loc) / scale) ** 2

    if post.name == "eight_schools-eight_schools_noncentered":
        def log_density(theta):
            z, mu, s = theta[:8], theta[8], theta[9]
            tau = jnp.exp(s)
            prior = (normal_lpdf(z, 0.0, 1.0).sum() + normal_lpdf(mu, 0.0, 5.0) - math.log(math.pi * 5.0)
                     - jnp.log1p((tau / 5.0) ** 2))
            return prior + normal_lpdf(d["y"], mu + tau * z, d["sigma"]).sum() + s
    elif post.name == "earnings-logearn_interaction_z":  # flat priors
        def log_density(theta):
            beta, s = theta[:-1], theta[-1]
            resid = d["y"] - d["X"] @ beta
            n = resid.shape[0]
            return -0.5 * n * log_2pi - n * s - 0.5 * jnp.exp(-2.0 * s) * (resid**2).sum() + s
    elif post.name == "garch-garch11":
        def log_density(theta):
            mu, a0, a1, b1 = theta[0], theta[1], theta[2], theta[3]
            alpha1 = sigmoid(a1)
            log_1m_alpha1 = log_sigmoid(-a1)
            beta1 = jnp.exp(log_1m_alpha1 + log_sigmoid(b1))
            r = (d["y"] - mu) ** 2
            c = jnp.concatenate([jnp.reshape(d["sigma1"] ** 2, (1,)), jnp.exp(a0) + alpha1 * r[:-1]])

            def scan(v, ct):
                v = ct + beta1 * v
                return v, v

            _, v = __import__("jax").lax.scan(scan, 0.0, c)
            lik = (-0.5 * log_2pi - 0.5 * jnp.log(v) - 0.5 * r / v).sum()
            return lik + a0 + log_sigmoid(a1) + 2.0 * log_1m_alpha1 + log_sigmoid(b1) + log_sigmoid(-b1)
    else:
        return None
    return log_density


def nuts_ours(closure, theta, start, warmup, draws, seed):
    counted, calls = counting(closure)

    with torch.no_grad():
        theta.copy_(start)
    sampler = torch_sample.NUTS([theta], lr=0.1, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    sampler.adapt(True, num_warmup=warmup)
    for _ in range(warmup):
        sampler.step(counted)
    sampler.adapt(False)
    t1 = time.perf_counter()
    calls_warmup = calls[0]
    out = torch.empty(draws, theta.numel(), dtype=theta.dtype)
    divergences, steps = 0, 0.0
    for i in range(draws):
        sampler.step(counted)
        out[i] = theta.detach()
        divergences += int(sampler.stats["diverging"])
        steps += sampler.stats["n_steps"]
    t2 = time.perf_counter()
    return dict(draws=out, warmup_time=t1 - t0, time=t2 - t1, evals=calls[0] - calls_warmup, divergences=divergences,
                step_size=sampler.step_size)


def nuts_pyro(log_density, start, warmup, draws, seed):
    import pyro
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    calls = [0]
    mark = {}

    def potential(z):
        calls[0] += 1
        return -log_density(z["theta"])

    def hook(kernel, params, stage, i):
        if stage == "Warmup" and i == warmup - 1:
            mark.update(time=time.perf_counter(), calls=calls[0])

    kernel = NUTS(potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True, full_mass=False,
                  target_accept_prob=0.8, max_tree_depth=10)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, initial_params={"theta": start.clone()},
                disable_progbar=True, hook_fn=hook)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run()
    t2 = time.perf_counter()
    out = mcmc.get_samples()["theta"].detach().reshape(draws, -1)
    divergences = len(mcmc.diagnostics()["divergences"]["chain 0"])
    return dict(draws=out, warmup_time=mark["time"] - t0, time=t2 - mark["time"], evals=calls[0] - mark["calls"],
                divergences=divergences, step_size=float(kernel.step_size))


class NumPyroRunner:
    """NumPyro's NUTS kernel (``numpyro.infer.hmc.hmc(algo="NUTS")``, the kernel its ``MCMC`` runs) in two jitted
    ``lax.scan`` loops, warmup and sampling, compiled once per posterior and reused by every chain (``MCMC``
    re-traces its loop on every ``run``/``warmup`` call, which would put seconds of compilation into each chain)."""

    def __init__(self, log_density, warmup, draws):
        import jax
        from numpyro.infer.hmc import hmc

        self.warmup = warmup
        self.init_kernel, sample_kernel = hmc(potential_fn=lambda th: -log_density(th), algo="NUTS")

        def loop(state, length):
            def body(s, _):
                s = sample_kernel(s)
                return s, (s.z, s.num_steps, s.diverging)

            return jax.lax.scan(body, state, None, length=length)

        self.warmup_loop = jax.jit(lambda state: loop(state, warmup)[0])
        self.sample_loop = jax.jit(lambda state: loop(state, draws))

    def run(self, start, seed):
        import jax

        key = jax.random.PRNGKey(seed)
        t0 = time.perf_counter()
        state = self.init_kernel(jax.numpy.asarray(start.numpy()), self.warmup, adapt_step_size=True,
                                 adapt_mass_matrix=True, dense_mass=False, target_accept_prob=0.8, max_tree_depth=10,
                                 rng_key=key)
        state = jax.block_until_ready(self.warmup_loop(state))
        t1 = time.perf_counter()
        state, (z, num_steps, diverging) = jax.block_until_ready(self.sample_loop(state))
        t2 = time.perf_counter()
        return dict(draws=torch.tensor(np.array(z)), warmup_time=t1 - t0, time=t2 - t1,
                    evals=int(np.asarray(num_steps).sum()), divergences=int(np.asarray(diverging).sum()),
                    step_size=float(state.adapt_state.step_size))


def nuts_main(args, names, samplers):
    """Every sampler adapts on its own (``--warmup`` steps: dual averaging to 0.8, a windowed diagonal metric,
    max tree depth 10) and then draws ``--draws`` per chain from the same starts; the chains run interleaved."""
    import arviz as az

    if "numpyro" in samplers:
        import jax

        jax.config.update("jax_enable_x64", True)
        import numpyro

        print(f"numpyro {numpyro.__version__}, jax {jax.__version__} ({jax.devices()[0].platform})", flush=True)
    rows = []
    for name in names:
        post = POSTERIORS[name]
        log_density, starts = density_and_starts(post, args)
        theta = starts[0].clone().requires_grad_(True)
        closures = {"ours": torch_sample.log_density_closure(log_density, theta)}
        compile_s = {}
        if "ours compiled" in samplers:
            t0 = time.perf_counter()
            closures["ours compiled"] = torch_sample.log_density_closure(log_density, theta, compile=True)
            theta.grad = None
            closures["ours compiled"]()  # compiles
            theta.grad = None
            compile_s["ours compiled"] = time.perf_counter() - t0
        numpyro_runner = None
        if "numpyro" in samplers:
            jax_ld = jax_log_density(post, post.data())
            if jax_ld is None:
                print(f"  note: no JAX log density for {name}: numpyro skipped")
            else:
                for s in starts:  # the same density, checked at the starts
                    lp_j = float(jax_ld(jax.numpy.asarray(s.numpy())))
                    assert abs(lp_j - float(log_density(s))) < 1e-8 * max(1.0, abs(lp_j)), (lp_j, log_density(s))
                numpyro_runner = NumPyroRunner(jax_ld, args.warmup, args.draws)
                t0 = time.perf_counter()
                numpyro_runner.run(starts[-1], args.seed + 999)  # compiles warmup and sampling (not counted below)
                compile_s["numpyro"] = time.perf_counter() - t0
        active = [s for s in samplers if s != "numpyro" or numpyro_runner is not None]
        results = {s: [] for s in active}
        for c in range(args.chains):
            seed = args.seed * 1000 + c
            for s in active:
                if s.startswith("ours"):
                    results[s].append(nuts_ours(closures[s], theta, starts[c], args.warmup, args.draws, seed))
                elif s == "pyro":
                    results[s].append(nuts_pyro(log_density, starts[c], args.warmup, args.draws, seed))
                else:
                    results[s].append(numpyro_runner.run(starts[c], seed))
        print(f"\n{name} (dim {post.dim})", flush=True)
        for s in active:
            rs = results[s]
            params = post.to_params(torch.stack([r["draws"].to(torch.float64) for r in rs]))
            ref = post.reference()
            ess = np.array([float(az.ess(params[p].numpy(), method="bulk")) for p in post.param_names])
            err = max(abs(params[p].numpy().mean() - ref[p].mean()) / ref[p].std() for p in post.param_names)
            row = dict(posterior=name, sampler=s, ess_min=ess.min(), ess_med=float(np.median(ess)),
                       time=sum(r["time"] for r in rs), warmup_time=sum(r["warmup_time"] for r in rs),
                       evals=sum(r["evals"] for r in rs), divergences=sum(r["divergences"] for r in rs),
                       step_size=float(np.mean([r["step_size"] for r in rs])), err=err,
                       compile=compile_s.get(s, 0.0))
            rows.append(row)
            print(f"  {s:<14} ESS min {row['ess_min']:7.0f}  median {row['ess_med']:7.0f}  "
                  f"sampling {row['time']:7.2f} s"
                  f"  warmup {row['warmup_time']:7.2f} s  grad evals {row['evals']}  divergences {row['divergences']}",
                  flush=True)
    print("\n| posterior | sampler | mean ε | leapfrogs/draw | divergences | ESS min | ESS median "
          "| sampling (s) | warmup (s) | compile (s) | ESS/s (min) | ESS/s (median) "
          "| ESS (min) per 1000 grad evals | max\\|Δmean\\|/sd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_draw = r["evals"] / (args.chains * args.draws)
        print(f"| {r['posterior']} | {r['sampler']} | {r['step_size']:.3g} | {per_draw:.1f} | {r['divergences']} "
              f"| {r['ess_min']:.0f} | {r['ess_med']:.0f} | {r['time']:.2f} | {r['warmup_time']:.2f} "
              f"| {r['compile']:.1f} | {r['ess_min'] / r['time']:.1f} | {r['ess_med'] / r['time']:.1f} "
              f"| {1000 * r['ess_min'] / r['evals']:.1f} | {r['err']:.3f} |")
    print("\n| posterior | ratio | ESS/s (min) | ESS/s (median) | ESS/grad (min) | ESS/grad (median) |")
    print("|---|---|---|---|---|---|")
    by = {(r["posterior"], r["sampler"]): r for r in rows}
    for name in dict.fromkeys(r["posterior"] for r in rows):
        for a in ("ours", "ours compiled"):
            for b in ("pyro", "numpyro"):
                if (name, a) not in by or (name, b) not in by:
                    continue
                x, y = by[(name, a)], by[(name, b)]
                per_s = [(x[k] / x["time"]) / (y[k] / y["time"]) for k in ("ess_min", "ess_med")]
                per_g = [(x[k] / x["evals"]) / (y[k] / y["evals"]) for k in ("ess_min", "ess_med")]
                print(f"| {name} | {a} / {b} | {per_s[0]:.2f}x | {per_s[1]:.2f}x | {per_g[0]:.2f} | {per_g[1]:.2f} |")


if __name__ == "__main__":
    main()
