"""Indexed datasets and index samplers: uniform minibatches and partition blocks (DESIGN.md §4).

Variance-reduced estimators need to know *which* examples a minibatch holds. `IndexedDataset`
wraps any dataset so that each item also carries its index; the samplers yield batches of
indices for a ``torch.utils.data.DataLoader(batch_sampler=...)``:

- `UniformIndexSampler`: a fresh seeded permutation of the data each epoch, cut into batches;
- `BlockSampler`: partition sampling. The data is split once, by a seeded permutation, into
  fixed blocks of ``block_size`` examples; every minibatch is a union of whole blocks, so a
  gradient table can keep one row per block instead of one per example.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["BlockSampler", "IndexedDataset", "Partition", "UniformIndexSampler"]


class IndexedDataset(Dataset):
    """``dataset[i]`` as ``(i, *item)`` (or ``(i, item)`` when the item is not a tuple)."""

    def __init__(self, dataset: Any):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset wraps a map-style dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (index, *item) if isinstance(item, tuple) else (index, item)


def _check_size(name: str, value: int, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class UniformIndexSampler(Sampler[list[int]]):
    """Batches of example indices from a fresh seeded permutation each epoch (without replacement).

    ``drop_last=False`` keeps a smaller last batch. The epoch counter advances on each iteration,
    so two epochs differ and a run with the same seed repeats exactly.
    """

    def __init__(self, num_data: int, batch_size: int, *, seed: int = 0, drop_last: bool = False):
        self.num_data = _check_size("num_data", num_data)
        self.batch_size = _check_size("batch_size", batch_size)
        if batch_size > num_data:
            raise ValueError(f"batch_size {batch_size} is larger than the data ({num_data} examples)")
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.num_data, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.num_data, generator=gen).tolist()
        for s in range(0, self.num_data, self.batch_size):
            batch = order[s : s + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch


class Partition:
    """A fixed split of ``num_data`` examples into blocks of ``block_size`` (the last may be smaller).

    The split is a seeded permutation, drawn once: ``blocks[j]`` are the examples of block j and
    ``block_of[i]`` is example i's block.
    """

    def __init__(self, num_data: int, block_size: int, *, seed: int = 0):
        self.num_data = _check_size("num_data", num_data)
        self.block_size = _check_size("block_size", block_size)
        if block_size > num_data:
            raise ValueError(f"block_size {block_size} is larger than the data ({num_data} examples)")
        self.seed = seed
        order = torch.randperm(num_data, generator=torch.Generator().manual_seed(seed))
        self.blocks: list[torch.Tensor] = list(order.split(block_size))
        self.block_of = torch.empty(num_data, dtype=torch.long)
        for j, members in enumerate(self.blocks):
            self.block_of[members] = j

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The distinct blocks of a batch that is a union of whole blocks; raises if it is not."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        blocks = self.block_of[indices].unique()
        expected = sum(len(self.blocks[j]) for j in blocks.tolist())
        if expected != indices.numel() or indices.unique().numel() != indices.numel():
            raise ValueError(
                "with partition sampling a minibatch must be a union of whole blocks, each example once; "
                "draw batches with vr_mcmc.data.BlockSampler built with the same num_data, block_size and seed"
            )
        return blocks


class BlockSampler(Sampler[list[int]]):
    """Minibatches that are unions of ``blocks_per_batch`` whole blocks of a seeded `Partition`.

    Each epoch visits every block once, in a fresh seeded order. The partition itself never
    changes (``sampler.partition``), so a gradient table with the same ``block_size`` and ``seed``
    keeps one row per block.
    """

    def __init__(self, num_data: int, block_size: int, blocks_per_batch: int = 1, *, seed: int = 0):
        self.partition = Partition(num_data, block_size, seed=seed)
        self.blocks_per_batch = _check_size("blocks_per_batch", blocks_per_batch)
        if blocks_per_batch > self.partition.num_blocks:
            raise ValueError(
                f"blocks_per_batch {blocks_per_batch} exceeds the {self.partition.num_blocks} blocks of the data"
            )
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.partition.num_blocks // self.blocks_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.partition.num_blocks, generator=gen).tolist()
        for s in range(0, len(order), self.blocks_per_batch):
            yield torch.cat([self.partition.blocks[j] for j in order[s : s + self.blocks_per_batch]]).tolist()
