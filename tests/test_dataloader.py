"""A DataLoader (or any iterable of ``(idx, *batch)``) as the data of `vr_mcmc.sample` (issue 20): the same draws
as the tensor path for the same indices, with real worker processes; exact resume through a loader (augmentation
in the workers and in the chain's process included); bad loaders refused before any draw; a map-style
IndexedDataset as before."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chain_job
import numpy as np
import pytest
import torch
from loader_job import Shifted
from test_chains import same_draws
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import vr_mcmc
from vr_mcmc.chains.loader import split_batch
from vr_mcmc.data import BlockSampler, IndexedDataset, UniformIndexSampler

X, Y, N = chain_job.X, chain_job.Y, chain_job.N
OPTIONS = dict(num_chains=2, num_warmup=10, num_samples=25, seed=3, progress=False,
               log_likelihood=chain_job.log_likelihood)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py
    yield


def _mark_worker(directory: str, worker_id: int) -> None:
    """worker_init_fn: leaves a file named after the worker process, to show that workers ran."""
    Path(directory, f"worker-{os.getpid()}-{worker_id}").touch()


def _sample(data, sampler=chain_job.sagald, loss_fn=chain_job.loss_fn, **kw):
    return vr_mcmc.sample(chain_job.model_fn, sampler, loss_fn, data, **{**OPTIONS, **kw})


def test_loader_with_two_workers_gives_the_tensor_paths_draws(tmp_path):
    """SAGA-LD (its table rows follow the indices), 2 chains × 35 steps of 20 = 6 epochs each: the loader's
    UniformIndexSampler is seeded per chain by the driver as the tensor path's index stream is, so every batch,
    hence every draw, is the same, bit for bit, with the batches loaded by 2 worker processes (which leave a file
    each to prove it). torch's own shuffle=True loader is taken over the same way."""
    tensors = _sample((X, Y), batch_size=20)
    loader = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_sampler=UniformIndexSampler(N, 20, seed=123),
                        num_workers=2, worker_init_fn=functools.partial(_mark_worker, str(tmp_path)))
    workers = _sample(loader)
    same_draws(tensors, workers)
    marks = [p.name for p in tmp_path.iterdir()]
    assert len({m.split("-")[1] for m in marks}) >= 2 and str(os.getpid()) not in {m.split("-")[1] for m in marks}
    assert {m.split("-")[2] for m in marks} == {"0", "1"}
    shuffled = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=20, shuffle=True)
    same_draws(tensors, _sample(shuffled, batch_size=20))
    assert not np.array_equal(tensors.posterior["weight"].values[0], tensors.posterior["weight"].values[1])


def test_a_map_style_indexed_dataset_still_works():
    """The dataset path fetches items at the stream's indices; loss_fn gets (x, y) without the index."""
    same_draws(_sample((X, Y), batch_size=20), _sample(IndexedDataset(TensorDataset(X, Y)), batch_size=20))


def test_block_sampler_loader_gives_the_partitioned_tensor_paths_draws():
    from test_sample_driver import BLOCK, partitioned_sagald

    tensors = _sample((X, Y), partitioned_sagald, batch_size=2 * BLOCK)
    loader = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_sampler=BlockSampler(N, BLOCK, 2, seed=5))
    same_draws(tensors, _sample(loader, partitioned_sagald))
    other = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_sampler=BlockSampler(N, BLOCK, 2, seed=6))
    with pytest.raises(ValueError, match=r"BlockSampler has block_size=10, seed=6 but the gradient table's .*seed=5"):
        _sample(other, partitioned_sagald)


def test_augmented_batches_are_the_same_in_worker_processes_and_in_the_chains():
    """Each batch of a loader of ours is loaded with the RNGs seeded from (chain, epoch, position): a random
    augmentation gives the same draws with 2 workers as in the chain's own process, whose RNG it leaves alone."""
    import loader_job

    in_process = loader_job.run(None, 25, workers=0)
    same_draws(in_process, loader_job.run(None, 25, workers=2))
    plain = _sample(DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_sampler=UniformIndexSampler(N, 20)),
                    num_samples=25)
    assert not np.array_equal(in_process.posterior["weight"].values, plain.posterior["weight"].values)


class _RaiseAt:
    """loss_fn that raises at its ``at``-th call: a run interrupted mid-epoch (its checkpoint directory is kept)."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("interrupted")
        return chain_job.loss_fn(model, batch)


@pytest.mark.parametrize("sampler, workers", [
    ("ours", 0), ("ours", 2), ("replacement", 0),
    # a fresh pair of workers each epoch of an iterable: 9 s on the shared 2-core machine
    pytest.param("replacement", 2, marks=pytest.mark.slow)])
def test_resume_through_a_loader_is_exact(tmp_path, sampler, workers):
    """A run interrupted in chain 1 (step 23 of 35; checkpoints every 7 steps, epochs of 6 batches, so the resume
    starts mid-epoch) and resumed gives the uninterrupted run's draws, bit for bit, with a random augmentation
    drawn in 2 worker processes or in the chain's own process; for a loader of ours (restarted at the saved
    batch) and for one the driver only iterates (a RandomSampler with replacement, whose random numbers come from
    torch: the interrupted epoch is replayed)."""
    def loader():
        batches = dict(batch_sampler=UniformIndexSampler(N, 20)) if sampler == "ours" else dict(
            batch_size=20, sampler=RandomSampler(range(N), replacement=True))
        return DataLoader(Shifted(), num_workers=workers, **batches)

    # SGLD with replacement: SAGA's table refuses a batch holding an example twice
    options = dict(checkpoint_every=7, sampler=chain_job.sagald if sampler == "ours" else chain_job.sgld)
    uninterrupted = _sample(loader(), **options)
    directory = tmp_path / "run"
    with pytest.raises(RuntimeError, match="interrupted") as info:
        _sample(loader(), loss_fn=_RaiseAt(35 + 23), checkpoint=directory, **options)
    assert info.value.partial.posterior.sizes["chain"] == 2  # chain 1 had begun
    resumed = _sample(loader(), checkpoint=directory, **options)
    same_draws(uninterrupted, resumed)  # two runs from scratch: a run also repeats, augmentation included


class Batches:
    """An iterable of (idx, x, y) batches that is not a DataLoader: consecutive slices of 30, in turn."""

    def __iter__(self):
        for s in range(0, N, 30):
            idx = torch.arange(s, min(s + 30, N))
            yield idx, X[idx], Y[idx]


def test_any_iterable_of_indexed_batches():
    """N comes from the sampler; the draws are those of stepping SAGA-LD by hand on the same batches."""
    idata = _sample(Batches(), num_chains=1, num_warmup=0, num_samples=9)
    torch.manual_seed(vr_mcmc.chains.chain_seeds(3, 0)[0])
    model = chain_job.model_fn()
    sampler = chain_job.sagald(model)
    weights = []
    for step in range(9):
        idx, x, y = list(Batches())[step % 4]
        sampler.zero_grad()
        loss = chain_job.loss_fn(model, (x, y))
        loss.backward()
        sampler.step(indices=idx, loss=loss)
        weights.append(model.weight.detach().clone())
    np.testing.assert_array_equal(idata.posterior["weight"].values[0], torch.stack(weights).numpy())


class Unindexed:
    def __iter__(self):
        yield X[:20], Y[:20]


def _hmc_sampler(model):
    return chain_job.hmc(model)


@pytest.mark.parametrize("data, sampler, kw, error, match", [
    (DataLoader(TensorDataset(X, Y), batch_size=20), chain_job.sagald, {}, TypeError,
     r"does not yield example indices: item 0 .*starts with a tensor of shape \(3,\).*IndexedDataset\(dataset\)"),
    (Unindexed(), chain_job.sagald, {}, TypeError, r"first element is a tensor of shape \(20, 3\).*IndexedDataset"),
    (iter(Batches()), chain_job.sagald, {}, TypeError, "data is an iterator"),
    (DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=20), _hmc_sampler, {}, TypeError,
     "uses all the data at every step"),
    (DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=20), chain_job.sagald, {"batch_size": 30},
     ValueError, "batch_size=30 but the DataLoader makes batches of 20"),
    (DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=20), "partitioned", {}, ValueError,
     r"partitioned \(block_size=10\).*BlockSampler"),
    ((X, Y), chain_job.sagald, {"batch_size": None}, TypeError, "batch_size is needed"),
])
def test_bad_data_is_refused_before_any_draw(tmp_path, data, sampler, kw, error, match):
    if sampler == "partitioned":
        from test_sample_driver import partitioned_sagald as sampler
    with pytest.raises(error, match=match):
        _sample(data, sampler, checkpoint=tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_parallel_chains_cannot_start_loader_workers(tmp_path):
    loader = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=20, num_workers=2)
    with pytest.raises(ValueError, match=r"daemonic process.*num_workers=0"):
        _sample(loader, chain_method="parallel")


def test_split_batch_names_the_problem():
    idx = torch.arange(4)
    assert split_batch((idx, X[:4], Y[:4]), N)[0].dtype == torch.long
    with pytest.raises(TypeError, match="1-d integer tensor"):
        split_batch((idx.float(), X[:4]), N)
    with pytest.raises(ValueError, match="4 indices with a tensor of 3 examples"):
        split_batch((idx, X[:3]), N)
    with pytest.raises(ValueError, match=r"index 120 outside \[0, 120\)"):
        split_batch((idx + 117, X[:4]), N)
    with pytest.raises(TypeError, match=r"a tuple of 1, not \(idx, x, ...\)"):
        split_batch((idx,), N)


def test_data_passes_are_counted_through_a_loader():
    """35 steps × 20 examples / 120."""
    idata = _sample(DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=20, shuffle=True), num_chains=1)
    np.testing.assert_allclose(idata.sample_stats["data_passes"].values[0, -1], 35 * 20 / N)


@pytest.mark.slow  # two spawned processes that import torch: 20 s on the shared 2-core machine
def test_parallel_chains_through_a_loader_give_the_sequential_draws():
    """The loader travels to each chain's process (pickled) and is taken over there as in the sequential run."""
    loader = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_sampler=UniformIndexSampler(N, 20))
    same_draws(_sample(loader), _sample(loader, chain_method="parallel"))


@pytest.mark.slow  # three runs in a subprocess and here: 22 s on the shared 2-core machine
def test_kill_9_through_a_loader_with_workers_resumes_exactly(tmp_path):
    """SIGKILL a run whose batches come from 2 DataLoader workers with a random augmentation, after 4 blocks of
    chain 0; its workers exit with it; the resumed run gives the uninterrupted run's draws."""
    from test_faults import _alive, _children

    here = Path(__file__).resolve().parent
    directory = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(here / "loader_job.py"), str(directory), "60"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (directory / "chain_0.000003.nc").exists():
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job made no progress in 120 s"
            time.sleep(0.02)
        workers: list[int] = []
        while not workers and time.monotonic() < deadline:  # an epoch's workers (not between two epochs)
            workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (directory / "results.nc").exists() and workers
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "DataLoader workers outlived the killed run"
    import loader_job

    same_draws(loader_job.run(directory, 60), loader_job.run(None, 60))


def test_kept_parameters_through_a_loader_are_the_tensor_paths(tmp_path):
    """keep_params with a DataLoader as the data (the two parts of issue 20 together): the ensemble's draws are the
    tensor path's, file for file, and equal to the recorded parameters of the kept draws."""
    tensors = _sample((X, Y), batch_size=20, keep_params=3, checkpoint=tmp_path / "tensors")
    loader = DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_sampler=UniformIndexSampler(N, 20, seed=1))
    through_loader = _sample(loader, keep_params=3, checkpoint=tmp_path / "loader")
    same_draws(tensors, through_loader)
    a = vr_mcmc.PosteriorEnsemble(tmp_path / "tensors", chain_job.model_fn())
    b = vr_mcmc.PosteriorEnsemble(tmp_path / "loader", chain_job.model_fn())
    assert len(a) == len(b) == 2 * (25 // 3) and a.draw_indices == b.draw_indices
    for i in range(len(a)):
        for name, value in a[i].items():
            assert torch.equal(value, b[i][name]), (i, name)
    chain, draw = a.draw_indices[1]
    assert torch.equal(a[1]["weight"].reshape(-1),
                       torch.as_tensor(tensors.posterior["weight"].values[chain, draw]).reshape(-1).to(a[1]["weight"]))
