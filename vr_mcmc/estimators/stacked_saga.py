"""SAGA's estimate for C chains at once, on their gradient tables stacked with a leading chain dimension.

Vectorized chains (`vr_mcmc.sample(..., chain_method="vectorized")`) keep one `SAGA` estimator and one
`vr_mcmc.storage.GradientTable` per chain (their state dicts, checkpoints and fallbacks are the sequential ones);
`StackedSAGA` moves the tables' rows and totals into [C, ...] tensors, each chain's table holding views of its slice,
and computes for all chains what `SAGA.estimate` computes for one:

    v_c = Σ_j h_cj + (N/B)·Σ_{i∈S_c}(g_ci − h_ci),   then h_ci ← g_ci for i ∈ S_c,

with the same invariant bookkeeping (``total`` = Σ of the rows as stored, the float32 running sums folded every
`FOLD_EVERY` updates into the float64 accumulator). `estimate` changes nothing; `commit` writes the rows and
totals, so a caller that finds a non-finite estimate can leave every table as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..storage.stores import DenseStore, FactoredStore
from ..storage.table import FOLD_EVERY
from .stacked_noise import factored_sq_norms, stacked_sampling_variance

__all__ = ["StackedSAGA"]


def fits(estimator: Any) -> bool:
    """Whether `StackedSAGA` computes exactly this estimator's step: SAGA (not SAG) on an allocated, unpartitioned
    table of lossless dense and factored rows covering every parameter the sampler updates."""
    from .saga import SAGA

    table = getattr(estimator, "table", None)
    return (type(estimator) is SAGA and table is not None and table.partition is None and bool(table.stores)
            and not estimator.uncovered and all(type(s) in (DenseStore, FactoredStore) and s.lossless
                                                for s in table.stores.values()))


class StackedSAGA:
    """The chains' SAGA estimators, their tables' tensors stacked (each table keeps views of its slice)."""

    def __init__(self, estimators: Sequence[Any]):
        self.estimators = list(estimators)
        self.tables = [e.table for e in self.estimators]
        first = self.tables[0]
        self.names = list(first.stores)
        self.kinds = {n: type(first.stores[n]) for n in self.names}
        self.rows: dict[str, list[torch.Tensor]] = {}
        for n in self.names:
            stores = [t.stores[n] for t in self.tables]
            attrs = ("data",) if self.kinds[n] is DenseStore else ("inputs", "grad_outputs")
            self.rows[n] = [self._stack(stores, a) for a in attrs]
        self.total = {n: self._stack_dict([t._total for t in self.tables], n) for n in first._total}
        self.exact = {n: self._stack_dict([t._exact for t in self.tables], n) for n in first._exact}
        self.recent = {n: self._stack_dict([t._recent for t in self.tables], n) for n in first._recent}
        self._pending: tuple | None = None
        self.noise_var: torch.Tensor | None = None

    @staticmethod
    def _stack(objects: Sequence[Any], attr: str) -> torch.Tensor:
        stacked = torch.stack([getattr(o, attr) for o in objects])
        for k, o in enumerate(objects):
            setattr(o, attr, stacked[k])
        return stacked

    @staticmethod
    def _stack_dict(dicts: Sequence[dict], key: str) -> torch.Tensor:
        stacked = torch.stack([d[key] for d in dicts])
        for k, d in enumerate(dicts):
            d[key] = stacked[k]
        return stacked

    def in_step(self) -> bool:
        """Whether the tables are at the same update count (a resume may have left them apart)."""
        return len({t._since_fold for t in self.tables}) == 1

    def estimate(self, indices: torch.Tensor, grads: Mapping[str, torch.Tensor], reps: Any,
                 diagnose: bool = False) -> dict[str, torch.Tensor]:
        """v [C, ...] per parameter name, for batches ``indices`` [C, B], batch-mean gradients ``grads`` [C, ...] and
        every chain's per-example gradients ``reps`` (a `vr_mcmc.chains.batched.StackedPerExample`); the table
        update is kept for `commit`. ``diagnose``: also SAGA's ``noise_var`` (the spread of g_j − h_j over the
        batch), per chain and parameter in `names` order, as ``self.noise_var`` [C, P] (else None)."""
        c, b = indices.shape
        # rows of chain k's table are rows k·N .. k·N + N − 1 of the stacked [C·N, ...] view: one index_select
        # and one index_copy_ per tensor (two-index advanced indexing costs several times more on small rows)
        rows = self.tables[0].num_rows
        flat = (torch.arange(c, device=indices.device).unsqueeze(1) * rows + indices).reshape(-1)
        scale = self.tables[0].num_data / b

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(c * rows, *t.shape[2:]).index_select(0, flat).reshape(c, b, *t.shape[2:])

        out, new_rows, sums, olds, squares = {}, {}, {}, {}, []
        for n in self.names:
            total = self.total[n]
            if self.kinds[n] is DenseStore:
                (data,) = self.rows[n]
                stored = gather(data).to(total.dtype)
                old = stored.sum(1)
                new_rows[n] = (reps.dense(n).to(data),)
                if diagnose:
                    squares.append((new_rows[n][0].to(total.dtype) - stored).reshape(c, b, -1).square().sum((1, 2)))
            else:
                inputs, grad_outputs = self.rows[n]
                a, z = gather(inputs).to(total.dtype), gather(grad_outputs).to(total.dtype)
                entry = reps.entries[n]
                if entry[0] != "factored":
                    raise TypeError(f"'{n}' is stored factored but its per-example gradients are not Factored")
                if diagnose:  # g_j − h_j as one factor pair over the new and the stored positions
                    both_a = torch.cat([entry[1].to(total.dtype), a], dim=3)
                    both_z = torch.cat([entry[2].to(total.dtype), -z], dim=3)
                    squares.append(factored_sq_norms(both_a, both_z).sum(1))
                g, t = a.shape[2], a.shape[3]
                # Factored.sum per chain: one matmul over the stacked (example, position) axis, per group
                a = a.transpose(1, 2).reshape(c, g, b * t, a.shape[-1])
                z = z.transpose(1, 2).reshape(c, g, b * t, z.shape[-1])
                old = torch.matmul(z.transpose(-1, -2), a).reshape(total.shape)
                new_rows[n] = (entry[1].to(inputs), entry[2].to(grad_outputs))
            s = grads[n] * b  # Σ_i g_i = B·∇(batch mean): the new rows' sum (lossless stores)
            sums[n], olds[n] = s.to(total.dtype), old
            out[n] = torch.add(total, sums[n] - old, alpha=scale).to(grads[n].dtype)
        self._pending = (flat, new_rows, sums, olds)
        self.noise_var = None
        if diagnose:
            moved = [sums[n] - olds[n] for n in self.names]
            self.noise_var = stacked_sampling_variance(squares, moved, b, self.tables[0].num_rows)
        return out

    def commit(self) -> None:
        """Writes the last `estimate`'s rows into the tables and moves their totals (and accumulators)."""
        flat, new_rows, sums, olds = self._pending
        self._pending = None
        for n in self.names:
            for stored, new in zip(self.rows[n], new_rows[n]):
                # distinct rows (a chain's batch has no repeats, chains own disjoint ranges): a plain scatter
                stored.view(-1, *stored.shape[2:]).index_copy_(0, flat, new.reshape(-1, *stored.shape[2:]))
            total = self.total[n]
            total.add_(sums[n]).sub_(olds[n])
            if n in self.recent:
                self.recent[n].add_(sums[n]).sub_(olds[n])
        for t in self.tables:
            t._since_fold += 1
            for store in t.stores.values():
                store._cached = None
        if self.tables[0]._since_fold >= FOLD_EVERY:
            for n, recent in self.recent.items():
                self.exact[n].add_(recent)
                recent.zero_()
                self.total[n].copy_(self.exact[n])
            for t in self.tables:
                t._since_fold = 0
        for e in self.estimators:  # SAGA's zero_grad check counts estimates (it needs none here: no .grad is read)
            e._estimates = getattr(e, "_estimates", 0) + 1
