"""The data side of a chain: the data as (N, fetch), and the resumable stream of minibatch indices
(DataLoaders and other iterables of ``(idx, *batch)``: `vr_mcmc.chains.loader`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["BlockStream", "IndexStream", "TensorBatches", "as_data", "chain_seeds", "index_stream"]


def chain_seeds(seed: int, chain: int) -> tuple[int, int]:
    """(torch seed, batch-stream seed) of chain ``chain`` of a run with ``seed``, derived as NumPy's
    ``SeedSequence(seed).spawn(...)[chain]`` derives them: runs with different seeds share no chain (a
    plain ``seed + chain`` would make chain c of seed s the chain c−1 of seed s+1)."""
    import numpy as np

    words = np.random.SeedSequence(seed, spawn_key=(chain,)).generate_state(2, np.uint32)
    return int(words[0]), int(words[1])


class IndexStream:
    """Batches of ``batch_size`` indices from a seeded permutation per epoch (the last batch of an
    epoch may be smaller); its state is (epoch, position), so it resumes exactly."""

    def __init__(self, num_data: int, batch_size: int, seed: int):
        self.num_data, self.batch_size, self.seed = num_data, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_data, generator=gen)

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        return self._order

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Every batch of epoch ``epoch``, in the order `next` gives them (the stream's state is left alone)."""
        return list(self._epoch_order(epoch).split(self.batch_size))

    def next(self) -> torch.Tensor:
        if self.position >= self.num_data:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        batch = self._permutation()[self.position : self.position + self.batch_size]
        self.position += batch.numel()
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def _order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s block order: a SeedSequence word of (seed, epoch), so that it shares no
    stream with the partition's own ``torch.manual_seed(table seed)`` (a plain ``seed + epoch`` would give
    chain 0 of seed 0 the partition's permutation as its first order)."""
    import numpy as np

    words = np.random.SeedSequence([seed, 0x8B10C4], spawn_key=(epoch,)).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


class BlockStream:
    """Partition sampling (`vr_mcmc.data.BlockSampler` semantics): batches are unions of
    ``blocks_per_batch`` whole blocks of ``partition`` (a `vr_mcmc.data.Partition`, e.g. the partitioned
    gradient table's own), each block once per epoch in a fresh seeded order; resumable as `IndexStream`.
    The order's seeds come from ``seed`` (the chain's stream seed) through `_order_seed`, not from the
    partition's seed."""

    def __init__(self, partition: Any, blocks_per_batch: int, seed: int):
        self.partition, self.seed = partition, seed
        self.blocks_per_batch = max(1, min(blocks_per_batch, partition.num_blocks))
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_order_seed(self.seed, epoch))
        return torch.randperm(self.partition.num_blocks, generator=gen)

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        return self._order

    def _union(self, chosen: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.partition.blocks[j] for j in chosen.tolist()])

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Every batch of epoch ``epoch``, in the order `next` gives them (the stream's state is left alone)."""
        return [self._union(chosen) for chosen in self._epoch_order(epoch).split(self.blocks_per_batch)]

    def next(self) -> torch.Tensor:
        if self.position >= self.partition.num_blocks:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        chosen = self._permutation()[self.position : self.position + self.blocks_per_batch]
        self.position += chosen.numel()
        return self._union(chosen)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def index_stream(sampler: Any, num_data: int, batch_size: int, seed: int) -> IndexStream | BlockStream:
    """The batch stream a sampler needs: block batches (``batch_size // block_size`` blocks, at least one) when
    its gradient table is partitioned (``block_size=k``), uniform batches otherwise."""
    table = getattr(getattr(sampler, "estimator", None), "table", None)
    partition = getattr(table, "partition", None)
    if partition is not None:
        return BlockStream(partition, batch_size // partition.block_size, seed)
    return IndexStream(num_data, batch_size, seed)


class TensorBatches:
    """The batches of a chain over tensors or a map-style dataset: the indices of its `IndexStream` /
    `BlockStream` and the data at them. ``next()`` -> (indices, batch tuple); its state is the stream's."""

    def __init__(self, data: Any, stream: IndexStream | BlockStream):
        self.num_data, self.fetch = as_data(data)
        self.stream = stream

    def next(self) -> tuple[torch.Tensor, tuple]:
        idx = self.stream.next()
        return idx, self.fetch(idx)

    def full_batch(self) -> tuple:
        """All the data, in order (for closure samplers: MALA, HMC, NUTS)."""
        return self.fetch(torch.arange(self.num_data))

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        pass


def as_data(data: Any) -> tuple[int, Callable[[torch.Tensor], tuple]]:
    """(N, fetch(indices) -> batch tuple) for a tuple of tensors, a map-style dataset, or an object with
    ``num_data`` and ``fetch`` (a rank's `vr_mcmc.distributed.Shard`)."""
    if hasattr(data, "num_data") and callable(getattr(data, "fetch", None)):
        return data.num_data, data.fetch
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        sizes = {t.shape[0] for t in data}
        if len(sizes) != 1:
            raise ValueError(f"the data tensors must share their first (example) dimension, got sizes {sorted(sizes)}")
        return sizes.pop(), lambda idx: tuple(t[idx.to(t.device)] for t in data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        from torch.utils.data import default_collate

        from ..data import IndexedDataset

        # an IndexedDataset's items start with their index, which the driver knows: loss_fn gets the rest, as
        # it does from tensors and from a DataLoader
        start = 1 if isinstance(data, IndexedDataset) else 0

        def fetch(idx: torch.Tensor) -> tuple:
            batch = default_collate([data[i] for i in idx.tolist()])
            return tuple(batch)[start:] if isinstance(batch, (list, tuple)) else (batch,)

        return len(data), fetch
    raise TypeError("data must be a tensor, a tuple of tensors (X, y, ...) or a map-style Dataset")
