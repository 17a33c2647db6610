"""Gradient estimators of one chain split across ranks by example (data parallel).

Every rank holds a contiguous shard of the examples (`shard_range`) and sees the same global batch S (same
seed); it computes the per-example gradients of its own examples S_r = S ∩ shard_r only. What is summed over
ranks (one all-reduce of one flat buffer a step):

- minibatch (SGLD and the SG family), the control variates (SGLD-CV, SVRG-LD): the batch's gradient
  Σ_{i∈S} g_i = Σ_r Σ_{i∈S_r} g_i, all-reduced right after each backward by the driver's closure, so that ``.grad``
  holds on every rank what one process would hold (DDP's gradient all-reduce); SVRG's full-gradient pass is each
  rank's pass over its own examples of the user's loader, all-reduced (`ShardedFullGradient`, `ShardLoader`);
- SAGA: each rank keeps the table rows of its shard only (h_j, j ∈ shard_r) and the sum of those rows; the estimate
  v = Σ_r [Σ_{j∈shard_r} h_j + (N/B)·Σ_{i∈S_r}(g_i − h_i)] is one all-reduce of the bracket (`ShardedSAGA`); each
  rank then writes its own rows.

The driver swaps an estimator's class for its sharded form (as ``torch.nn.utils.parametrize`` swaps a module's
class), so the sampler, its options and its state dict stay the user's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..estimators import SAG, SAGA, ControlVariate, Estimator, Minibatch
from ..estimators.base import batch_sum, grad_or_zeros
from ..storage import GradientTable
from .group import Comm
from .sharding import local_positions

__all__ = ["ShardLoader", "ShardedFullGradient", "ShardedSAGA", "flat_all_reduce", "shard_estimator"]


def flat_all_reduce(comm: Comm, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Σ over ranks of ``tensors`` (any shapes), as one all-reduce of one flat buffer in their promoted dtype; new
    tensors of the original shapes and dtypes."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    comm.all_reduce(flat, what)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


class ShardedSAGA(SAGA):
    """SAGA with this rank's rows of the table only (see the module docstring). ``loss_slot``/``pending_loss``:
    the batch loss travels in the same all-reduce (set by the driver before each step)."""

    rows: range
    comm: Comm
    pending_loss: torch.Tensor | None = None  # this rank's share of the batch loss, set by the driver
    loss_slot: torch.Tensor | None = None  # filled in place with the global batch loss

    def shard(self, rows: range, comm: Comm) -> None:
        table = self.table
        if table.partition is not None:
            raise ValueError("data_parallel=True does not support a partitioned gradient table (block_size=): its "
                             "blocks mix examples of every shard. Use block_size=None, or chains across ranks")
        if table.stores:
            raise ValueError("data_parallel=True: the SAGA table was filled before sampling (initialize() in "
                             "sampler_fn); each rank builds its own rows, so leave the table empty (rows start at 0)")
        self.rows, self.comm = rows, comm
        self.table = GradientTable(dict(table.params), len(rows), policy=table.policy, rank=table.rank,
                                   dtype=table.storage_dtype, device=table.device, seed=table.seed)

    def estimate(self, indices, closure):
        batch = int(indices.numel())
        local = local_positions(indices, self.rows)
        b = int(local.numel())
        scale = self.num_data / batch
        reps = old = None
        if b:
            self._estimates = getattr(self, "_estimates", 0) + 1
            if self._estimates <= 8 or self._estimates % 64 == 0:
                self.check_grad_is_the_batchs()
            reps = self.engine.collect()
            old = self.table.sum_rows(local)
        total = self.table.total
        parts, sums = [], {}
        for name, p in self.covered:
            if b:
                s = batch_sum(grad_or_zeros(p), b, self.loss_reduction)
                sums[name] = s
                parts.append(torch.add(total[name], s.to(total[name].dtype) - old[name], alpha=scale))
            else:
                parts.append(total[name])
        self._warn_uncovered()
        for p in self.uncovered:
            parts.append(batch_sum(grad_or_zeros(p), b, self.loss_reduction) * scale if b else torch.zeros_like(p))
        loss = self.pending_loss if self.pending_loss is not None else torch.zeros(())
        parts.append(loss.detach().reshape(1))
        reduced = flat_all_reduce(self.comm, parts, "the all-reduce of the SAGA estimate")
        for p, v in zip([p for _, p in self.covered] + self.uncovered, reduced):
            p.grad = v.to(p.dtype)
        if self.loss_slot is not None:
            self.loss_slot.copy_(reduced[-1].reshape(()))
        if b:
            self.table.update(local, reps, sums)
        return {"grad_evals": batch}


class ShardLoader:
    """The user's full-data loader (``(idx, *data)`` batches) restricted to this rank's examples: every batch is read
    as the loader makes it (so a loader that draws from the global RNG, as a DataLoader does once per pass, draws
    the same numbers as in one process), and only this rank's rows of it go forward; batches without any are
    skipped. The reading is not sharded, the forward and backward passes are."""

    def __init__(self, loader: Any, rows: range):
        self.loader, self.rows = loader, rows

    def __iter__(self):
        for batch in self.loader:
            idx, *data = batch
            idx = torch.as_tensor(idx).reshape(-1)
            keep = (idx >= self.rows.start) & (idx < self.rows.stop)
            if bool(keep.any()):
                yield (idx[keep], *(d[keep.to(d.device)] for d in data))


class ShardedFullGradient:
    """The control variates' full-gradient pass over this rank's examples (`ShardLoader`), all-reduced."""

    rows: range
    comm: Comm

    def full_gradient(self) -> list[torch.Tensor]:
        total, count = self._summed_pass()
        if count != len(self.rows):
            raise RuntimeError(f"the shard's full-gradient pass visited {count} examples, not {len(self.rows)}")
        return flat_all_reduce(self.comm, total, "the all-reduce of the full-gradient pass")


_CLASSES: dict[tuple[type, type], type] = {}


def _sharded_class(mixin: type, cls: type) -> type:
    if (mixin, cls) not in _CLASSES:
        _CLASSES[(mixin, cls)] = type(f"Sharded{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CLASSES[(mixin, cls)]


def shard_estimator(estimator: Estimator, rows: range, comm: Comm) -> str:
    """Turns ``estimator`` into its data-parallel form in place; returns who all-reduces the batch gradient:
    ``"closure"`` (the driver, after each backward) or ``"estimator"`` (SAGA, with its table)."""
    if isinstance(estimator, SAG):
        raise ValueError("data_parallel=True does not support SAG (a biased optimizer's estimate); use SAGA")
    if isinstance(estimator, SAGA):
        if type(estimator) is not SAGA:
            raise ValueError(f"data_parallel=True has no sharded form of {type(estimator).__name__}")
        estimator.__class__ = ShardedSAGA
        estimator.shard(rows, comm)
        return "estimator"
    if isinstance(estimator, ControlVariate):
        estimator.__class__ = _sharded_class(ShardedFullGradient, type(estimator))
        estimator.rows, estimator.comm, estimator.loader = rows, comm, ShardLoader(estimator.loader, rows)
        return "closure"
    if type(estimator) is Minibatch:
        return "closure"
    raise ValueError(f"data_parallel=True has no sharded form of the estimator {type(estimator).__name__}: it "
                     "supports Minibatch (SGLD, SGHMC, pSGLD, SGNHT), SAGA (SAGA-LD), SVRG (SVRG-LD) and "
                     "ControlVariate (SGLD-CV)")
