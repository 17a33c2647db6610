"""DataLoaders and other iterables of ``(idx, *batch)`` as the data of `vr_mcmc.sample` (DESIGN.md §7).

A pipeline's ``torch.utils.data.DataLoader`` brings augmentation, worker processes and pinned memory. The
variance-reduced estimators need to know which examples a batch holds (a SAGA table row per example), so
every batch must start with its examples' indices: a DataLoader over a `vr_mcmc.data.IndexedDataset` yields
``(idx, x, y)``. ``loss_fn`` gets the rest of the batch, ``(x, y)``, as it gets ``(X[idx], Y[idx])`` from
tensors, so one ``loss_fn`` serves both.

Two kinds of loader, by their batch sampler:

- **Ours** (`vr_mcmc.data.UniformIndexSampler`, `vr_mcmc.data.BlockSampler`, or torch's own
  ``shuffle=True`` sampler: a ``BatchSampler`` over a ``RandomSampler`` without replacement): the driver
  draws each chain's batches itself, from the chain's seed, exactly as for tensors (`IndexStream`,
  `BlockStream`; the sampler's own seed is not used), and a copy of the loader (the same dataset,
  collate_fn, workers, pinned memory) loads them for the whole chain. Each batch is loaded with torch's CPU
  RNG, Python's ``random`` and NumPy's global RNG seeded from (chain seed, epoch, position) (`SeededItems`;
  the chain's own RNG states are restored around it in its own process), so a random augmentation is a
  function of the batch's place in the chain alone. Hence chains differ, a run repeats, the draws are the
  same whatever ``num_workers`` is (and equal the tensor path's for the same data without augmentation),
  and a resume starts the loader at the saved batch: exact, nothing replayed. Workers start once per chain
  (and once per resume).
- **Any other iterable** (a DataLoader with a sequential, weighted or custom sampler, an IterableDataset, an
  object whose ``__iter__`` yields batches): each pass over it is an epoch, started with torch's CPU RNG and
  the loader's ``generator`` seeded from (chain seed, epoch), outside the chain's own RNG. A resume
  **replays**: the interrupted epoch is started again with the same seeds and the batches already used are
  loaded and dropped (data loading only, no gradients), so the worker processes' random state, hence the
  augmentation, is where it was. Exact for iterables whose randomness comes from torch (the CPU RNG, the
  loader's generator, the workers' seeds; with ``num_workers=0`` the transforms after the first batch of an
  epoch use the chain's torch RNG, which the checkpoint saves); an iterable with other randomness resumes
  with other batches, still a valid chain. A DataLoader starts its workers afresh each pass.

Augmentation and a gradient table: a stored row h_i is the gradient of the augmented example i as drawn when
i was last visited. The SAGA estimate stays unbiased for the augmented target (the expected loss over the
augmentation) whatever the table holds, but a row no longer equals the gradient the example would give
now, even at the same parameters, so g_i − h_i no longer vanishes near the mode: more variance
(measured in benchmarks/RESULTS.md, "Augmentation and the gradient table").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from .stream import BlockStream, IndexStream, TensorBatches, as_data, index_stream

__all__ = ["IterableBatches", "LoaderBatches", "batch_source", "check_data", "data_size", "describe",
           "is_iterable_data"]

_FIX = ("wrap the dataset so that each item starts with its index: DataLoader(vr_mcmc.data.IndexedDataset(dataset), "
        "...) yields (idx, x, y)")


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of the chain with stream seed ``seed`` (a SeedSequence word: no stream
    shared with the index order's seeds)."""
    import numpy as np

    words = np.random.SeedSequence([seed, 0x10AD], spawn_key=(epoch,)).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def is_iterable_data(data: Any) -> bool:
    """Whether ``data`` goes through this module: a DataLoader, or an iterable that is not tensors or a
    map-style dataset (those go through `vr_mcmc.chains.stream.as_data`)."""
    if isinstance(data, DataLoader):
        return True
    if isinstance(data, (tuple, list, torch.Tensor)):  # tensors (or a mistake that as_data names)
        return False
    try:
        as_data(data)
    except TypeError:  # not tensors nor a dataset (a ValueError, tensors of different lengths, goes to the user)
        return hasattr(data, "__iter__")
    return False


def _map_style(dataset: Any) -> bool:
    return (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
            and not isinstance(dataset, torch.utils.data.IterableDataset))


def data_size(data: Any) -> int | None:
    """N for any data `vr_mcmc.sample` takes; None for an iterable whose dataset has no length (N is then the
    sampler's ``num_data``)."""
    if not is_iterable_data(data):
        return as_data(data)[0]
    dataset = getattr(data, "dataset", None)
    return len(dataset) if _map_style(dataset) else None


# -- which loaders are ours ------------------------------------------------------------------------------


def _owned_sampler(loader: Any) -> tuple[str, Any] | None:
    """("uniform", (batch_size, drop_last)) or ("blocks", BlockSampler) when the loader's batches are drawn by a
    sampler the driver can replace by a per-chain stream; None otherwise."""
    from ..data import BlockSampler, UniformIndexSampler

    if not isinstance(loader, DataLoader) or not _map_style(loader.dataset):
        return None
    bs = loader.batch_sampler
    if isinstance(bs, UniformIndexSampler) and bs.num_data == len(loader.dataset):
        return "uniform", (bs.batch_size, bs.drop_last)
    if isinstance(bs, BlockSampler) and bs.partition.num_data == len(loader.dataset):
        return "blocks", bs
    if (type(bs) is BatchSampler and type(bs.sampler) is RandomSampler and not bs.sampler.replacement
            and bs.sampler.num_samples == len(loader.dataset)):
        return "uniform", (bs.batch_size, bs.drop_last)
    return None


def _loader_batch_size(loader: Any) -> int | None:
    owned = _owned_sampler(loader)
    if owned is None:
        return getattr(loader, "batch_size", None)
    kind, how = owned
    return how[0] if kind == "uniform" else how.blocks_per_batch * how.partition.block_size


def _table_partition(sampler: Any) -> Any:
    return getattr(getattr(getattr(sampler, "estimator", None), "table", None), "partition", None)


def _owned_stream(loader: DataLoader, sampler: Any, seed: int) -> tuple[IndexStream | BlockStream, bool]:
    """The chain's index stream for an owned loader (seeded by the chain), and whether to drop a short last
    batch."""
    kind, how = _owned_sampler(loader)
    num_data = len(loader.dataset)
    if kind == "uniform":
        batch_size, drop_last = how
        return index_stream(sampler, num_data, batch_size, seed), drop_last
    partition = _table_partition(sampler)
    return BlockStream(partition if partition is not None else how.partition, how.blocks_per_batch, seed), False


# -- checks before any draw ------------------------------------------------------------------------------


def _check_items(dataset: Any, where: str) -> None:
    """Items 0 and N − 1 of a map-style dataset must start with their own index."""
    n = len(dataset)
    for j in sorted({0, n - 1}):
        item = dataset[j]
        first = item[0] if isinstance(item, (tuple, list)) and len(item) >= 2 else None
        if isinstance(first, torch.Tensor) and first.dim() == 0 and not first.is_floating_point():
            first = int(first)
        if isinstance(first, bool) or not isinstance(first, int) or first != j:
            got = f"is a {type(item).__name__}" if first is None else f"starts with {_show(item[0])}"
            raise TypeError(f"{where} does not yield example indices: item {j} of its dataset "
                            f"({type(dataset).__name__}) {got}, not with its index {j}. The gradient tables "
                            f"need each batch's indices: {_FIX}")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value) if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"


def split_batch(batch: Any, num_data: int | None) -> tuple[torch.Tensor, tuple]:
    """(indices, rest) of a batch ``(idx, *batch)``; a clear error if it does not start with indices."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"the data yielded a batch that is a {type(batch).__name__}"
                        f"{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}, not (idx, x, ...): "
                        f"every batch must start with its examples' indices; {_FIX}")
    idx = batch[0]
    if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point() or idx.is_complex()
            or idx.dtype == torch.bool):
        raise TypeError(f"the data yielded a batch whose first element is {_show(idx)}, not a 1-d integer "
                        f"tensor of example indices; {_FIX}")
    for t in batch[1:]:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] != idx.shape[0]:
            raise ValueError(f"the data yielded {idx.shape[0]} indices with a tensor of {t.shape[0]} examples: "
                             "the first element of each batch must index its examples, one index each")
    if num_data is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_data):
        bad = int(idx.max()) if int(idx.max()) >= num_data else int(idx.min())
        raise ValueError(f"the data yielded example index {bad} outside [0, {num_data}): indices must number "
                         f"the N = {num_data} examples")
    return idx.long().cpu(), tuple(batch[1:])


def check_data(data: Any, sampler: Any, batch_size: int | None, parallel: bool) -> None:
    """Refuses, before any draw, iterable data the chains cannot use, naming the fix."""
    from torch_sample.closure import ClosureSampler

    if not is_iterable_data(data):
        if batch_size is None:
            raise TypeError("batch_size is needed with tensors or a map-style dataset (a DataLoader brings its own)")
        return
    kind = "a DataLoader" if isinstance(data, DataLoader) else f"an iterable ({type(data).__name__})"
    if isinstance(sampler, ClosureSampler):
        raise TypeError(f"{type(sampler).__name__} uses all the data at every step, which {kind} does not give: "
                        "pass the tensors or the map-style dataset (e.g. loader.dataset) as data")
    if not isinstance(data, DataLoader) and iter(data) is data:
        raise TypeError("data is an iterator, which can be iterated once, but each chain and each epoch iterates the "
                        "data again: pass a DataLoader, or an object whose __iter__ starts a new pass")
    if parallel and getattr(data, "num_workers", 0) > 0:
        raise ValueError("chain_method='parallel' runs each chain in a daemonic process, which cannot start the "
                         f"DataLoader's num_workers={data.num_workers} worker processes: use num_workers=0 (the "
                         "chains already run in parallel) or chain_method='sequential'")
    known = _loader_batch_size(data)
    if batch_size is not None and known is not None and batch_size != known:
        raise ValueError(f"batch_size={batch_size} but the DataLoader makes batches of {known}: leave batch_size out "
                         "(None) with a DataLoader, or make them agree")
    owned = _owned_sampler(data)
    partition = _table_partition(sampler)
    if partition is not None:
        bs = owned[1] if owned is not None and owned[0] == "blocks" else None
        if bs is None:
            raise ValueError(f"the sampler's gradient table is partitioned (block_size={partition.block_size}), so "
                             "every batch must be a union of whole blocks: give the DataLoader batch_sampler="
                             f"vr_mcmc.data.BlockSampler(N, {partition.block_size}, blocks_per_batch, "
                             f"seed={partition.seed}), or pass the tensors or dataset as data")
        if (bs.partition.block_size, bs.partition.seed) != (partition.block_size, partition.seed):
            raise ValueError(f"the DataLoader's BlockSampler has block_size={bs.partition.block_size}, "
                             f"seed={bs.partition.seed} but the gradient table's partition has block_size="
                             f"{partition.block_size}, seed={partition.seed}: build the BlockSampler with the table's")
    dataset = getattr(data, "dataset", None)
    if isinstance(data, DataLoader) and _map_style(dataset):
        _check_items(dataset, "the DataLoader")
        return
    with torch.random.fork_rng(devices=[]):  # the first batch, to see that it starts with indices
        iterator = iter(data)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError(f"{kind} gave no batch") from None
        finally:
            _shutdown(iterator)
    split_batch(first, data_size(data))


def describe(data: Any) -> Any:
    """What identifies iterable data in a run's fingerprint (a resume with other data is refused)."""
    dataset = getattr(data, "dataset", None)
    owned = _owned_sampler(data)
    return {"type": type(data).__name__, "dataset": type(dataset).__name__ if dataset is not None else None,
            "len": data_size(data), "batch_size": _loader_batch_size(data),
            "batches": None if owned is None else owned[0],
            "block_size": owned[1].partition.block_size if owned is not None and owned[0] == "blocks" else None}


# -- the chain's batches ---------------------------------------------------------------------------------


def _shutdown(iterator: Any) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class _Batches:
    """What the chain runner needs of a batch source over iterable data: the state (epoch, position of the next
    batch), resumed by reopening the iterator there, and a close that stops a DataLoader's workers."""

    epoch: int
    position: int
    _iter: Iterator | None

    def full_batch(self) -> tuple:
        raise TypeError("closure samplers need the whole data at every step: pass tensors or a map-style dataset")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        if self._iter is not None:
            _shutdown(self._iter)
        self._iter = None


class IterableBatches(_Batches):
    """Any other iterable of ``(idx, *batch)``: a pass is an epoch, started with torch's CPU RNG (and a
    DataLoader's generator) seeded by (chain seed, epoch). State: (epoch, batches used in it); a resume replays
    the epoch's first batches, loading and dropping them, outside the chain's own RNG."""

    def __init__(self, data: Iterable, num_data: int | None, seed: int):
        self.data, self.num_data, self.seed = data, num_data, seed
        self.epoch, self.position = 0, 0
        self._iter: Iterator | None = None
        self._pending: list[Any] = []  # a batch fetched while the epoch was opened

    def _start(self) -> Iterator:
        generator = getattr(self.data, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(self.data)

    def _open(self) -> None:
        with torch.random.fork_rng(devices=[]):
            # the epoch's seeds, and nothing drawn from the chain's own RNG: batches already used are replayed
            # (their transforms included) without moving it
            torch.random.default_generator.manual_seed(_epoch_seed(self.seed, self.epoch))  # CPU only: forked
            self._iter = self._start()
            for used in range(self.position):
                if next(self._iter, None) is None:
                    raise ValueError(f"resuming epoch {self.epoch}, the data gave {used} batches where the run "
                                     f"had used {self.position}: resume with the data the run was started with")
            if self.position == 0:
                self._pending = [next(self._iter, None)]

    def _next_batch(self) -> Any:
        if self._pending:
            return self._pending.pop()
        return next(self._iter, None)

    def next(self) -> tuple[torch.Tensor, tuple]:
        if self._iter is None:
            self._open()
        batch = self._next_batch()
        if batch is None:  # the epoch is over
            if self.position == 0:
                raise ValueError("the data gave no batch in a pass over it")
            self.close()
            self.epoch, self.position = self.epoch + 1, 0
            self._open()
            batch = self._next_batch()
            if batch is None:
                raise ValueError(f"the data gave no batch in pass {self.epoch} over it (a one-pass iterable?): "
                                 "each chain and epoch iterates the data again")
        self.position += 1
        return split_batch(batch, self.num_data)

    def close(self) -> None:
        super().close()
        self._pending = []


def _batch_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of batch ``position`` of epoch ``epoch`` of the chain with stream seed ``seed`` (63 bits)."""
    import numpy as np

    words = np.random.SeedSequence([seed, 0xBA7C4], spawn_key=(epoch, position)).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's CPU RNG, Python's ``random`` and NumPy's global RNG seeded by ``seed`` inside, restored after (in
    the chain's own process, its random numbers are left as they were)."""
    import random

    import numpy as np

    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class SeededItems(torch.utils.data.Dataset):
    """A map-style dataset fetched a batch at a time, each batch ``(seed, indices)`` with the random number
    generators seeded by its seed (`_seeded`): a batch's augmentation is a function of its seed alone, the same
    in any worker process or in the chain's own, and found again on resume."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: tuple[int, list[int]]) -> list:
        seed, indices = batch
        with _seeded(seed):
            getitems = getattr(self.dataset, "__getitems__", None)
            return list(getitems(indices)) if getitems else [self.dataset[i] for i in indices]


class _ChainBatchSampler:
    """The chain's batches from (epoch, position) on, without end: ``(seed, indices)`` per batch, the indices from
    the chain's `IndexStream` / `BlockStream` and the seed from (chain seed, epoch, position)."""

    def __init__(self, owner: LoaderBatches, epoch: int, position: int):
        self.owner, self.epoch, self.position = owner, epoch, position

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch, position = self.epoch, self.position
        while True:
            batches = self.owner.epoch_batches(epoch)
            for k in range(position, len(batches)):
                yield _batch_seed(self.owner.seed, epoch, k), batches[k].tolist()
            epoch, position = epoch + 1, 0


class LoaderBatches(_Batches):
    """A DataLoader whose batch sampler is ours: the chain's batches come from its `IndexStream` / `BlockStream`
    (as for tensors), each loaded with its own seed (`SeededItems`) by a copy of the loader that lives as long as
    the chain (its workers start once, and once more on a resume, which starts at the saved batch). State:
    (epoch, position) of the next batch."""

    def __init__(self, loader: DataLoader, sampler: Any, seed: int):
        self.loader, self.seed, self.num_data = loader, seed, len(loader.dataset)
        self.stream, self.drop_last = _owned_stream(loader, sampler, seed)
        self.epoch, self.position = 0, 0
        self._iter: Iterator | None = None
        self.epoch_length = len(self.epoch_batches(0))  # the same every epoch

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The batches of epoch ``epoch`` (a short last one dropped if the loader's sampler drops it)."""
        batches = self.stream.epoch_batches(epoch)
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < len(batches[0]):
            batches.pop()
        return batches

    def _open(self) -> None:
        loader = self.loader
        kwargs: dict[str, Any] = dict(
            batch_sampler=_ChainBatchSampler(self, self.epoch, self.position), num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
            # the workers' base seed from this generator, not from the chain's RNG (batches reseed anyway)
            generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)),
            prefetch_factor=loader.prefetch_factor)
        if loader.pin_memory_device:
            kwargs["pin_memory_device"] = loader.pin_memory_device
        self._iter = iter(DataLoader(SeededItems(loader.dataset), **kwargs))  # in order: the position counts

    def next(self) -> tuple[torch.Tensor, tuple]:
        if self._iter is None:
            self._open()
        batch = next(self._iter)
        self.position += 1
        if self.position >= self.epoch_length:
            self.epoch, self.position = self.epoch + 1, 0
        return split_batch(batch, self.num_data)



def batch_source(data: Any, sampler: Any, batch_size: int | None, seed: int) -> Any:
    """A chain's batches: ``next()`` -> (indices, batch tuple for loss_fn), ``full_batch()``, ``state_dict()``,
    ``load_state_dict()``, ``close()``, ``num_data``. ``seed``: the chain's stream seed."""
    if not is_iterable_data(data):
        num_data = as_data(data)[0]
        return TensorBatches(data, index_stream(sampler, num_data, batch_size, seed))
    if _owned_sampler(data) is not None:
        return LoaderBatches(data, sampler, seed)
    num_data = data_size(data)
    return IterableBatches(data, num_data if num_data is not None else getattr(sampler, "num_data", None), seed)

