"""A DataLoader (or any iterable of ``(idx, *batch)``) as the data of `vr_mcmc.sample` (issue 20): the same draws
as the tensor path for the same indices, with real worker processes; exact resume through a loader (augmentation
in the workers and in the chain's process included); bad loaders refused before any draw; a map-style
IndexedDataset as before."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import chain_job
import numpy as np
import pytest
import torch
from test_chains import same_draws
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

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


class Shifted(Dataset):
    """(i, x_i + 0.3·ξ, y_i), ξ ~ N(0, I) from torch's RNG: an augmentation, random at each visit."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple:
        return i, X[i] + 0.3 * torch.randn(X.shape[1]), Y[i]


class _RaiseAt:
    """loss_fn that raises at its ``at``-th call: a run interrupted mid-epoch (its checkpoint directory is kept)."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("interrupted")
        return chain_job.loss_fn(model, batch)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("sampler", ["ours", "replacement"])
def test_resume_through_a_loader_is_exact(tmp_path, workers, sampler):
    """A run interrupted in chain 1 (step 23 of 35; checkpoints every 7 steps, epochs of 6 batches, so the resume
    replays a part of an epoch) and resumed gives the uninterrupted run's draws, bit for bit, with a random
    augmentation drawn in 2 worker processes or in the chain's own process; for a loader of ours and for one the
    driver only iterates (a RandomSampler with replacement, whose random numbers come from torch)."""
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
