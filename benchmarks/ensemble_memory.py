"""Resident memory of a posterior ensemble of a 1M-parameter model (issue 20, must-show 1).

An MLP 784-1024-192-10 (1,002,570 parameters, 3.8 MiB of float32 a draw), sampled by SGLD on synthetic data with
``vr_mcmc.sample(..., keep_params=2)``: 2 chains × 60 kept draws = 120 parameter draws on disk, with RSS sampled
during the run, and the same run without ``keep_params`` as the baseline (each in a process of its own). Then
``PosteriorEnsemble(dir, model).evaluate((x, y))`` on 2,000 inputs, with RSS (from /proc/self/status) sampled every
20 ms: it should stay flat as the draws go by (one draw in memory at a time), far below the 120 draws' size. The
predictive ``ensemble.predict(x)`` is checked against the mean of the draws' softmax computed by hand (each file
read with safetensors' own ``load_file`` into a fresh model, float64 sums). Last, the parts of writing one draw
are timed apart (20 draws), against a sampling step.

    python benchmarks/ensemble_memory.py [--draws-per-chain 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import arviz  # noqa: F401  (imported up front, as a user has it: its modules are not draws)
import numpy as np
import torch
import torch.nn.functional as F

import torch_sample
import vr_mcmc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chain_memory import rss_mb  # one RSS reading for both memory benchmarks


class Watch:
    """RSS every ``every`` seconds in a thread, with the time since start."""

    def __init__(self, every: float = 0.02):
        self.every, self.samples, self.done = every, [], threading.Event()
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter() - self.start, rss_mb()))
            time.sleep(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.thread.join()
        return self.samples


def report(samples: list[tuple[float, float]], duration: float, draws: int, draw_mb: float, what: str) -> float:
    """RSS at fractions of a phase (draws go by at a steady rate), its range after the first 25% (the first
    checkpoints and the allocator's growth come before), its peak, and the slope of a straight line fitted to RSS
    against the draws done over that range (MB per draw); returns the median RSS over that range."""
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        t, r = min(samples, key=lambda s: abs(s[0] - frac * duration))
        print(f"  {frac:4.0%} of the {what} (t = {t:5.1f} s): RSS {r:6.0f} MB")
    steady = np.array([(t, r) for t, r in samples if t > 0.25 * duration])
    slope = np.polyfit(steady[:, 0] / duration * draws, steady[:, 1], 1)[0]
    peak = max(r for _, r in samples)
    print(f"  peak RSS {peak:.0f} MB; after the first 25% RSS ranged {steady[:, 1].min():.0f}-{steady[:, 1].max():.0f} "
          f"MB (median {np.median(steady[:, 1]):.0f}), fitted slope {slope:+.3f} MB per draw (holding the draws would "
          f"be {draw_mb:+.1f} MB per draw)")
    return float(np.median(steady[:, 1]))


def model_fn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 192),
                               torch.nn.ReLU(), torch.nn.Linear(192, 10))


def write_path_ms(folder: Path, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per draw of each part of writing one (vr_mcmc.chains.params.write_draw's steps, timed apart)."""
    from vr_mcmc.chains import params
    from vr_mcmc.chains.checkpoint import sha256

    folder.mkdir(parents=True, exist_ok=True)
    model = model_fn()
    parts = {"state_dict to CPU": 0.0, "safetensors write": 0.0, "fsync": 0.0, "sha256 read-back": 0.0}
    for i in range(repeats):
        path = folder / f"draw_{i}.safetensors"
        t0 = time.perf_counter()
        tensors = params.state_tensors(model)
        t1 = time.perf_counter()
        params._save(tensors, path, params.draw_metadata(0, i))
        t2 = time.perf_counter()
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        t3 = time.perf_counter()
        sha256(path)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key] += dt * 1000 / repeats
    shutil.rmtree(folder, ignore_errors=True)
    return parts


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2000, 784, generator=gen), torch.randint(0, 10, (2000,), generator=gen)


def sample_phase(keep: int, draws_per_chain: int, chains: int, out: Path) -> None:
    """One run of vr_mcmc.sample (keep=0: without keep_params), in a process of its own so that the two runs do
    not share an allocator; prints its RSS trace as JSON."""
    x, y = problem()

    def sampler_fn(model):
        return torch_sample.SGLD(model.parameters(), lr=1e-6, num_data=len(x), prior=torch_sample.priors.Normal(1.0))

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    initial = rss_mb()
    watch = Watch()
    vr_mcmc.sample(model_fn, sampler_fn, loss_fn, (x, y), batch_size=32, num_chains=chains, num_warmup=0,
                   num_samples=draws_per_chain * 2, keep_params=keep or None, record={}, checkpoint=out,
                   checkpoint_every=20, progress=False, seed=0)
    samples = watch.stop()
    print(json.dumps({"initial": initial, "samples": samples}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws-per-chain", type=int, default=60)
    parser.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--phase", choices=["all", "sample"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    chains = 2
    if args.phase == "sample":
        sample_phase(args.keep, args.draws_per_chain, chains, Path(args.out))
        return
    size = sum(p.numel() for p in model_fn().parameters())
    draw_mb = size * 4 / 2**20
    directory = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ensemble_memory_")) / "run"
    load = [os.getloadavg()[0]]
    traces = {}
    for keep in (0, 2):  # the same run without keep_params first: what sampling alone holds
        out = directory if keep else directory.parent / f"{directory.name}_baseline"
        run = subprocess.run([sys.executable, __file__, "--phase", "sample", "--keep", str(keep), "--out", str(out),
                              "--draws-per-chain", str(args.draws_per_chain)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(run.stderr[-3000:])
        traces[keep] = json.loads(run.stdout.strip().splitlines()[-1])
        if not keep:
            shutil.rmtree(out)
        load.append(os.getloadavg()[0])
    on_disk = sum(p.stat().st_size for p in (directory / "params").iterdir()) / 2**20

    x_eval, y_eval = problem(seed=1)
    ensemble = vr_mcmc.PosteriorEnsemble(directory, model_fn(), batch_size=500)
    total = len(ensemble)
    before = rss_mb()
    watch = Watch()
    scores = ensemble.evaluate((x_eval, y_eval))
    samples = watch.stop()
    evaluated = samples[-1][0]

    predictive = ensemble.predict(x_eval).numpy()
    from safetensors.torch import load_file

    hand = np.zeros((len(x_eval), 10))
    fresh = model_fn().eval()
    for i in range(total):
        fresh.load_state_dict(load_file(str(ensemble.path(i))))
        with torch.no_grad():
            hand += fresh(x_eval).double().softmax(-1).numpy()
    hand /= total
    diff = float(np.abs(predictive - hand).max())
    write = write_path_ms(directory.parent / "write_path")
    load.append(os.getloadavg()[0])

    print(f"torch {torch.__version__}, 1 thread, load {min(load):.1f}-{max(load):.1f}; MLP with {size:,} parameters "
          f"({draw_mb:.1f} MiB a draw); {chains} chains x {args.draws_per_chain} kept draws = {total} draws "
          f"({total * draw_mb:,.0f} MiB if held in memory; {on_disk:,.0f} MiB on disk)")
    plateau, steps = {}, 2 * args.draws_per_chain * chains
    for keep, trace in traces.items():
        seconds = trace["samples"][-1][0]
        print(f"sample({'keep_params=' + str(keep) if keep else 'without keep_params'}), {2 * args.draws_per_chain} "
              f"steps x {chains} chains: {seconds:.0f} s, RSS before {trace['initial']:.0f} MB")
        plateau[keep] = report([tuple(s) for s in trace["samples"]], seconds, total, draw_mb, "run")
    print(f"median RSS after the first quarter, keep_params=2 minus without: {plateau[2] - plateau[0]:+.0f} MB")
    print(f"evaluate on {len(x_eval):,} inputs: {evaluated:.1f} s ({evaluated / total * 1000:.0f} ms a draw); "
          f"log-lik {scores['log_likelihood']:.4f}, accuracy {scores['accuracy']:.3f}, ECE {scores['ece']:.4f}, "
          f"Brier {scores['brier']:.4f}; RSS before {before:.0f} MB")
    report(samples, evaluated, total, draw_mb, "draws")
    print("writing one draw, mean of 20 (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in write.items()) +
          f"; total {sum(write.values()):.1f} ms. In the runs above: "
          f"{1000 * traces[0]['samples'][-1][0] / steps:.0f} ms a step without keep_params, "
          f"{1000 * (traces[2]['samples'][-1][0] - traces[0]['samples'][-1][0]) / total:.0f} ms more per kept draw "
          "with it")
    print(f"predictive vs the mean of the {total} draws' softmax by hand (safetensors.load_file, fresh model, float64 "
          f"sums): max |difference| {diff:.2e}")
    if not args.out:
        shutil.rmtree(directory.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
