"""One data-parallel chain (``vr_mcmc.sample(..., data_parallel=True)``) on 1 and 2 processes: steps per second and
the bytes all-reduced per step (issue 21.3).

    python benchmarks/distributed.py [--steps 300] [--repeats 3]

For each model (MLP 64-32-10 at B = 32, and MLP 784-256-256-10 at B = 128; N = 4096 random examples; SAGA-LD and
SGLD) it runs the same chain (same seed) as: one process without torch.distributed ("plain"), one rank
(``data_parallel=True`` on a world of one: the all-reduce path, no peer), and two ranks on 127.0.0.1 (gloo), each
rank started as torchrun starts it (environment variables) with one torch thread. Steps per second are rank 0's
``sampling_time`` (the chain's own time: no imports, no start-up), the median of ``--repeats`` runs; the bytes per
step are what rank 0 all-reduced (`vr_mcmc.distributed.group.TRAFFIC`) over the steps. Prints the machine's load:
on shared cores the two ranks compete with other jobs, so the ratio below says what this machine gave then.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = {"mlp-64-32-10": ((64, 32, 10), 32), "mlp-784-256-256-10": ((784, 256, 256, 10), 128)}
NUM_DATA = 4096


def job(model: str, sampler: str, steps: int, data_parallel: bool) -> dict:
    """One run in this process (a rank when the torchrun variables are set); rank 0's figures, or None."""
    import torch
    import torch.nn.functional as F

    import torch_sample
    import vr_mcmc
    from vr_mcmc.distributed.group import TRAFFIC
    from vr_mcmc.models import mlp

    torch.set_num_threads(1)
    sizes, batch = MODELS[model]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(NUM_DATA, sizes[0], generator=gen), torch.randint(0, sizes[-1], (NUM_DATA,), generator=gen)

    def sampler_fn(m):
        if sampler == "sagald":
            s = torch_sample.SAGALD(m.parameters(), lr=1e-6, num_data=NUM_DATA, engine=vr_mcmc.PerExampleGradients(m),
                                    prior=torch_sample.priors.Normal(1.0))
        else:
            s = torch_sample.SGLD(m.parameters(), lr=1e-6, num_data=NUM_DATA, prior=torch_sample.priors.Normal(1.0))
        s.noise_ratio_every = 0  # data parallel turns the diagnostic off: the same work a step in every setting
        return s

    result = vr_mcmc.sample(lambda: mlp(sizes), sampler_fn, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y),
                            batch_size=batch, num_chains=1, num_warmup=0, num_samples=steps, record=[],
                            progress=False, data_parallel=data_parallel, seed=1)
    if result is None:
        return {}
    seconds = float(result["sample_stats"].attrs["sampling_time"])
    params = sum(p.numel() for p in mlp(sizes).parameters())
    return {"steps_per_s": steps / seconds, "bytes_per_step": TRAFFIC["all_reduce_bytes"] / steps,
            "calls_per_step": TRAFFIC["all_reduce_calls"] / steps, "params": params}


def launch(world: int, model: str, sampler: str, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        procs = []
        for rank in range(world):
            env = dict(os.environ, WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, __file__, "--rank-job", model, sampler, str(steps), out],
                                          env=env))
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise RuntimeError(f"a rank failed with exit code {p.returncode}")
        with open(out) as f:
            return json.load(f)


def plain(model: str, sampler: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plain.json")
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
        subprocess.run([sys.executable, __file__, "--plain-job", model, sampler, str(steps), out], env=env, check=True,
                       timeout=900)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-job", nargs=4, metavar=("MODEL", "SAMPLER", "STEPS", "OUT"))
    parser.add_argument("--plain-job", nargs=4, metavar=("MODEL", "SAMPLER", "STEPS", "OUT"))
    args = parser.parse_args()
    for flag, dp in ((args.rank_job, True), (args.plain_job, False)):
        if flag:
            model, sampler, steps, out = flag
            figures = job(model, sampler, int(steps), dp)
            if figures:
                with open(out, "w") as f:
                    json.dump(figures, f)
            return
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load at start "
          f"{os.getloadavg()[0]:.1f}; {args.steps} steps, median of {args.repeats}, 1 torch thread per process")
    print(f"{'model':<20} {'sampler':<7} {'plain':>8} {'1 rank':>8} {'2 ranks':>8} {'2r/1r':>6} {'2r/plain':>8} "
          f"{'bytes/step':>11} {'= (P+1)·4':>10} {'calls':>5}")
    for model in MODELS:
        for sampler in ("sgld", "sagald"):
            runs = {"plain": [], 1: [], 2: []}
            traffic = {}
            for _ in range(args.repeats):  # interleaved, so that a change of load hits every setting alike
                runs["plain"].append(plain(model, sampler, args.steps)["steps_per_s"])
                for world in (1, 2):
                    figures = launch(world, model, sampler, args.steps)
                    runs[world].append(figures["steps_per_s"])
                    traffic[world] = figures
            rate = {k: statistics.median(v) for k, v in runs.items()}
            t = traffic[2]
            print(f"{model:<20} {sampler:<7} {rate['plain']:>8.1f} {rate[1]:>8.1f} {rate[2]:>8.1f} "
                  f"{rate[2] / rate[1]:>6.2f} {rate[2] / rate['plain']:>8.2f} {t['bytes_per_step']:>11,.0f} "
                  f"{(t['params'] + 1) * 4:>10,} {t['calls_per_step']:>5.2f}", flush=True)
    print(f"load at end {os.getloadavg()[0]:.1f} (steps per second; 2r/1r > 1 means two processes helped)")


if __name__ == "__main__":
    main()
