"""Which examples and which chains each rank holds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Shard", "chain_share", "local_positions", "shard_range"]


def shard_range(num_data: int, world_size: int, rank: int) -> range:
    """The examples rank ``rank`` of ``world_size`` holds in data-parallel sampling: a contiguous range of example
    indices, the first ``num_data % world_size`` ranks holding one more (as ``numpy.array_split``). Its gradient-table
    rows are these examples, in this order; `vr_mcmc.storage.plan(model, x, num_data=len(shard_range(...)))` gives
    the table's bytes on that rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(num_data, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def chain_share(num_chains: int, world_size: int, rank: int) -> list[int]:
    """The chains rank ``rank`` runs when chains are spread over the ranks: a contiguous run of chain numbers, the
    first ``num_chains % world_size`` ranks running one more (ranks beyond ``num_chains`` run none)."""
    return list(shard_range(num_chains, world_size, rank))


def local_positions(indices: torch.Tensor, rows: range) -> torch.Tensor:
    """The entries of a global batch of example indices that fall in ``rows`` (order kept), as this rank's row
    numbers (index − rows.start)."""
    mine = indices[(indices >= rows.start) & (indices < rows.stop)]
    return mine - rows.start


class Shard:
    """The data of one rank in data-parallel sampling, when each rank loads only its own examples: ``tensors`` hold
    the rows ``shard_range(num_data, world_size, rank)`` of a data set of ``num_data`` examples, in order, and
    ``start`` is that range's start. Pass it as ``data`` to ``vr_mcmc.sample(..., data_parallel=True)``; it is
    checked against the rank's range before sampling. Example, each rank reading its rows of a memory-mapped array::

        rows = shard_range(N, dist.get_world_size(), dist.get_rank())
        data = Shard((torch.from_numpy(x_mmap[rows.start:rows.stop]), y[rows.start:rows.stop]), N, rows.start)
    """

    def __init__(self, tensors: Sequence[torch.Tensor] | torch.Tensor, num_data: int, start: int):
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("Shard holds this rank's rows as a tensor or a tuple of tensors (X, y, ...)")
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise ValueError(f"the shard's tensors must share their first (example) dimension, got {sorted(sizes)}")
        self.tensors, self.num_data, self.start = tensors, int(num_data), int(start)
        self.rows = range(self.start, self.start + sizes.pop())
        if self.start < 0 or self.rows.stop > self.num_data:
            raise ValueError(f"a shard of rows {self.rows.start}..{self.rows.stop - 1} does not fit a data set of "
                             f"{self.num_data} examples")

    def __len__(self) -> int:
        return self.num_data

    def fetch(self, indices: torch.Tensor) -> tuple:
        """The examples at global ``indices``, all of which must be this rank's."""
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.numel() and (int(idx.min()) < self.rows.start or int(idx.max()) >= self.rows.stop):
            raise IndexError(f"this rank's Shard holds examples {self.rows.start}..{self.rows.stop - 1} of "
                             f"{self.num_data} only, and examples {int(idx.min())}..{int(idx.max())} were asked for: a "
                             "Shard is data for vr_mcmc.sample(..., data_parallel=True) under torchrun")
        local = idx - self.start
        return tuple(t[local.to(t.device)] for t in self.tensors)

    def fingerprint(self) -> list:
        """What the ranks compare: the data set's size and each tensor's trailing shape and dtype."""
        return [[self.num_data, *t.shape[1:], str(t.dtype)] for t in self.tensors]
