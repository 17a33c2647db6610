"""Which examples and which chains each rank holds."""

from __future__ import annotations

import torch

__all__ = ["chain_share", "local_positions", "shard_range"]


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
