"""Per-block sums of per-example gradients, for partition sampling, without leaving the representation.

``merge_examples(rep, group, num_groups, group_size)`` returns a representation with one "example"
per group whose gradient is the sum of the group members' gradients: factors concatenate along
positions (a block of k examples with T positions each becomes one row of k·T positions), low-rank
factors along the rank, embedding lookups along lookups, dense gradients add. Groups are padded
with zeros to ``group_size`` members so that every block row has the same shape.
"""

from __future__ import annotations

import torch

from ..per_example import Dense, Factored, LowRank, PerExampleGradient, RowSparse

__all__ = ["merge_examples"]


def _padded_members(group: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """[num_groups, group_size] indices into the batch; missing members point at index B (a zero row)."""
    b = group.numel()
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups)
    if int(counts.max()) > group_size:
        raise ValueError(f"a block has {int(counts.max())} members in this batch, more than its size {group_size}")
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(b, device=group.device) - starts[group[order]]
    members = torch.full((num_groups, group_size), b, dtype=torch.long, device=group.device)
    members[group[order], slot] = order
    return members


def _stack_members(t: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """t [B, ...] -> [num_groups, group_size, ...] with zero rows for padding."""
    padded = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
    return padded[members]


def merge_examples(
    rep: PerExampleGradient, group: torch.Tensor, num_groups: int, group_size: int
) -> PerExampleGradient:
    """A representation of ``num_groups`` rows, row j = Σ_{i: group[i] = j} g_i."""
    group = torch.as_tensor(group, dtype=torch.long, device=rep.device)
    if isinstance(rep, Dense):
        out = rep.grads.new_zeros(num_groups, *rep.shape)
        return Dense(out.index_add_(0, group, rep.grads), scale=rep.scale)
    members = _padded_members(group, num_groups, group_size)
    if isinstance(rep, Factored):
        a = _stack_members(rep.inputs, members)  # [N_g, k, G, T, d_in]
        z = _stack_members(rep.grad_outputs, members)
        n_g, k, g, t = a.shape[:4]
        a = a.permute(0, 2, 1, 3, 4).reshape(n_g, g, k * t, a.shape[-1])
        z = z.permute(0, 2, 1, 3, 4).reshape(n_g, g, k * t, z.shape[-1])
        return Factored(a, z, rep.shape)
    if isinstance(rep, RowSparse):
        idx = _stack_members(rep.indices, members).reshape(num_groups, -1)
        vals = _stack_members(rep.values, members).reshape(num_groups, idx.shape[1], rep.shape[1])
        return RowSparse(idx, vals, rep.num_rows)
    if isinstance(rep, LowRank):
        u = _stack_members(rep.left, members)  # [N_g, k, m, r]
        v = _stack_members(rep.right, members)  # [N_g, k, r, n]
        n_g, k, m, r = u.shape
        return LowRank(u.permute(0, 2, 1, 3).reshape(n_g, m, k * r), v.reshape(n_g, k * r, v.shape[-1]), rep.shape)
    raise TypeError(f"cannot merge {type(rep).__name__} gradients into blocks")
