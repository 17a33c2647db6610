"""`GradientTable`: one stored gradient per example (or per partition block), for SAGA-type estimators."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..data import Partition
from ..per_example import PerExampleGradient
from ..per_example.representations import combine
from .blocks import merge_examples
from .packed import PackedRows, flat_vector
from .planner import RowLayout, available_bytes, strategy_bytes
from .stores import DenseStore, FactoredStore, LowRankStore, SparseStore, Store

__all__ = ["GradientTable", "TableTooLargeError"]

POLICIES = ("auto", "dense", "factored", "lowrank")
FOLD_EVERY = 16  # updates between folds of the float32 running sums into the float64 accumulator
_RECOMPUTE_ELEMENTS = 1 << 26  # bound on the elements of the rows recomputed at once


class TableTooLargeError(MemoryError):
    """The table would not fit in the free memory of its device."""


class GradientTable:
    """Rows h_j, one per example (or per block of ``block_size`` examples), and ``total = Σ_j h_j``.

    Storage per parameter, chosen when the first gradients arrive (``update``), by ``policy``:

    - ``"dense"``: ``[rows, *shape]`` (the paper's naive table);
    - ``"factored"``: Linear-type gradients as their factors, T·(d_in + d_out) numbers a row;
      other parameters dense;
    - ``"lowrank"``: rank-``rank`` truncated SVD of each row's gradient matrix (randomized SVD),
      recording the relative error dropped (``lowrank_error``); vector parameters dense;
    - ``"auto"``: per parameter, the cheapest exact layout (factors, embedding lookups or dense).

    Packed: when every parameter is stored dense or factored, in one storage dtype, without ``block_size``,
    the rows of all parameters lie side by side in one ``[rows, W]`` tensor (`vr_mcmc.storage.packed.PackedRows`;
    the stores are views of it, so it costs no memory) and the totals in one vector. SAGA's step on it
    (``packed_rows``) is a handful of tensor operations whatever the number of parameters: on a small model
    that, not the arithmetic, sets the cost of a step.

    ``dtype`` is the storage dtype (e.g. float16/bfloat16). Sums of rows, and ``total``, are in
    the parameters' dtype, or float32 for lower-precision parameters (SAGA's estimate is in that
    dtype). The invariant: after every ``update``, ``total`` equals the sum of the rows as
    actually stored (after compression and rounding), so SAGA's estimate stays unbiased. Below
    float64, adding and subtracting batch sums into a float32 total would round at the scale of
    the total every step, a drift that grows with the steps (4e-6 relative after 10^4 steps,
    measured); so the batch sums also go into a small buffer that is folded every
    ``FOLD_EVERY`` updates into a float64 accumulator, from which ``total`` is then reset. What
    separates ``total`` from the rows' sum is then the rounding of each batch's own sums and at
    most ``FOLD_EVERY`` float32 roundings of the total, whatever the number of steps. A table larger than the free
    memory of its device is refused before allocation (`TableTooLargeError`, listing cheaper
    strategies).

    With ``block_size=k`` the rows are the blocks of a seeded `vr_mcmc.data.Partition`
    (``seed``); every batch given to ``update``/``sum_rows`` must be a union of whole blocks, as
    `vr_mcmc.data.BlockSampler` (same num_data, block_size, seed) draws them.
    """

    def __init__(
        self,
        params_or_model: nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
        num_data: int,
        policy: str = "auto",
        rank: int | None = None,
        block_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        seed: int = 0,
    ):
        if isinstance(params_or_model, nn.Module):
            params = {n: p for n, p in params_or_model.named_parameters() if p.requires_grad}
        elif isinstance(params_or_model, Mapping):
            params = dict(params_or_model)
        else:
            raise TypeError(
                "GradientTable takes the model or a dict {name: parameter} with the names engine.collect() "
                "uses (e.g. dict(model.named_parameters())), not an unnamed iterable of parameters"
            )
        if not params:
            raise ValueError("GradientTable needs at least one trainable parameter")
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "lowrank" and (rank is None or rank < 1):
            raise ValueError("policy='lowrank' needs rank >= 1 (e.g. rank=4)")
        if policy != "lowrank" and rank is not None:
            raise ValueError(f"rank={rank} applies to policy='lowrank' only (got policy={policy!r})")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"the storage dtype must be a floating-point dtype, got {dtype}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        self.params = params
        self.num_data = num_data
        self.policy = policy
        self.rank = rank
        self.block_size = block_size
        self.partition = Partition(num_data, block_size, seed=seed) if block_size else None
        self.num_rows = self.partition.num_blocks if self.partition else num_data
        self.storage_dtype = dtype
        self.device = torch.device(device) if device is not None else next(iter(params.values())).device
        self.seed = seed
        self.stores: dict[str, Store] = {}
        self.layouts: dict[str, RowLayout] = {}
        # total in at least float32: bfloat16 sums of many updates would drift. Below float64, a float64
        # accumulator of the batch sums (`_exact`) and the float32 sums since its last fold (`_recent`).
        # With one accumulation dtype, each of these is a vector over all parameters with a view per name (one
        # operation moves them all in a packed table; the per-name views serve every other use).
        compute = {torch.promote_types(p.dtype, torch.float32) for p in params.values()}
        self._vectors: dict[str, torch.Tensor] | None = None
        if len(compute) == 1:
            (dtype_sum,) = compute
            shapes = {n: p.shape for n, p in params.items()}
            self._vectors = {}
            self._vectors["total"], self._total = flat_vector(shapes, dtype_sum, self.device)
            if dtype_sum != torch.float64:
                self._vectors["exact"], self._exact = flat_vector(shapes, torch.float64, self.device)
                self._vectors["recent"], self._recent = flat_vector(shapes, dtype_sum, self.device)
            else:
                self._exact, self._recent = {}, {}
        else:
            self._total = {
                n: torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=self.device)
                for n, p in params.items()
            }
            low = [n for n, t in self._total.items() if t.dtype != torch.float64]
            self._exact = {n: torch.zeros_like(self._total[n], dtype=torch.float64) for n in low}
            self._recent = {n: torch.zeros_like(self._total[n]) for n in low}
        self._total_views = dict(self._total)
        self.packed: PackedRows | None = None  # the packed rows, once allocated (see packed_rows)
        self._since_fold = 0
        self._last_rows: tuple | None = None  # (indices, their version, _rows' answer)

    # -- layout -------------------------------------------------------------------------------

    def _layout_for(self, name: str, layout: RowLayout) -> str:
        dtype = self._dtype(name)
        if self.policy == "dense":
            return "dense"
        if self.policy == "factored":
            return "factored" if layout.kind == "factored" else "dense"
        if self.policy == "lowrank":
            return layout.lowrank_or_exact(self.num_rows, dtype, self.rank)
        return layout.cheapest_exact(self.num_rows, dtype)

    def _dtype(self, name: str) -> torch.dtype:
        return self.storage_dtype or self.params[name].dtype

    def _allocate(self, reps: Mapping[str, PerExampleGradient]) -> None:
        self._allocate_layouts({n: RowLayout.of(rep) for n, rep in reps.items()})

    def _allocate_layouts(self, layouts: Mapping[str, RowLayout]) -> None:
        chosen = {n: self._layout_for(n, lay) for n, lay in layouts.items()}
        need = sum(layouts[n].bytes(chosen[n], self.num_rows, self._dtype(n), self.rank or 1) for n in layouts)
        free = available_bytes(self.device)
        if need > free:
            raise TableTooLargeError(self._too_large_message(need, free, layouts))
        packed = (self.partition is None and self._vectors is not None and set(layouts) == set(self.params)
                  and set(chosen.values()) <= {"dense", "factored"} and len({self._dtype(n) for n in layouts}) == 1)
        if packed:
            slots = {n: (chosen[n], lay.shape, (lay.groups, lay.positions, lay.d_in, lay.d_out))
                     for n, lay in ((n, layouts[n]) for n in self.params)}
            self.packed = PackedRows(slots, self.num_rows, self._dtype(next(iter(self.params))), self.device)
            self._reorder_vectors(self.packed.order)
        for n, lay in layouts.items():
            dtype, rows = self._dtype(n), self.num_rows
            compute = self._total[n].dtype  # sums of rows in the accumulation dtype (>= float32)
            kind = chosen[n]
            if kind == "factored":
                store: Store = FactoredStore(rows, lay.shape, lay.groups, lay.positions, lay.d_in, lay.d_out, dtype,
                                             self.device, compute, self.packed.views(n) if packed else None)
            elif kind == "sparse":
                store = SparseStore(rows, lay.shape, lay.lookups, dtype, self.device, compute)
            elif kind == "lowrank":
                store = LowRankStore(rows, lay.shape, self.rank, dtype, self.device, compute, seed=self.seed)
            else:
                store = DenseStore(rows, lay.shape, dtype, self.device, compute,
                                   data=self.packed.views(n)[0] if packed else None)
            self.stores[n] = store
        self.layouts = dict(layouts)

    def _reorder_vectors(self, order: list[str]) -> None:
        """Lay the total vectors out in ``order`` (the packed rows' order), values kept."""
        shapes = {n: self.params[n].shape for n in order}
        for key, views in (("total", self._total), ("exact", self._exact), ("recent", self._recent)):
            if key not in self._vectors:
                continue
            vector, new = flat_vector(shapes, self._vectors[key].dtype, self.device)
            for n in order:
                new[n].copy_(views[n])
                views[n] = new[n]
            self._vectors[key] = vector
        self._total_views = dict(self._total)

    def _too_large_message(self, need: int, free: int, layouts: Mapping[str, RowLayout]) -> str:
        k_default = min(128, self.num_data)

        def total(strategy: str, rank: int = 1, k: int = k_default) -> int:
            return sum(strategy_bytes(lay, strategy, self.num_data, self._dtype(n), rank, k)
                       for n, lay in layouts.items())

        options = [
            ("policy='dense'", total("naive")),
            ("policy='factored'", total("factored")),
            ("policy='auto'", total("auto")),
            ("policy='lowrank', rank=1", total("rank", 1)),
            ("policy='lowrank', rank=4", total("rank", 4)),
            (f"block_size={k_default}", total("partition")),
            (f"policy='lowrank', rank=1, block_size={k_default}", total("rank+partition")),
        ]
        cheaper = "; ".join(f"{what}: {b / 1e9:.3g} GB" for what, b in options if b < need)
        return (
            f"the gradient table needs {need / 1e9:.3g} GB but {self.device} has {free / 1e9:.3g} GB free. "
            f"Cheaper strategies for these {self.num_data:,} examples: {cheaper or 'none'}"
            " (a lower storage dtype, e.g. dtype=torch.bfloat16, halves each)."
        )

    # -- rows ---------------------------------------------------------------------------------

    def _rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows touched by a batch and, with partition sampling, each example's position among them.

        SAGA asks for the same batch's rows three times a step (``sum_rows``, ``row_differences``, ``update``):
        the last answer is kept for the same index tensor, unchanged since (its version counter), and the
        checks (two host syncs and a sort) run once."""
        memo = self._last_rows
        if memo is not None and memo[0] is indices and memo[1] == indices._version:
            return memo[2]
        found = self._find_rows(indices)
        if isinstance(indices, torch.Tensor) and not (indices.is_inference() or torch.is_inference_mode_enabled()):
            self._last_rows = (indices, indices._version, found)
        return found

    def _find_rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(f"indices must be integer example indices, got dtype {idx.dtype}")
        idx = idx.to(torch.long).reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_data):
            raise IndexError(f"example indices must lie in [0, {self.num_data}); got {idx.min()}..{idx.max()}")
        if idx.unique().numel() != idx.numel():
            raise ValueError("a batch must not hold an example twice")
        if self.partition is None:
            return idx, None
        rows = self.partition.rows(idx)
        position = torch.searchsorted(rows, self.partition.block_of[idx])
        return rows, position

    def update(
        self,
        indices: torch.Tensor,
        grads: Mapping[str, PerExampleGradient],
        sums: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Replace the rows of a batch with its per-example gradients (``engine.collect()``).

        ``sums``: Σ_i g_i of the batch per parameter, if the caller has it (B·``p.grad`` after a
        mean loss); lossless stores then skip recomputing the sum of the rows just written. A
        missing or None entry counts as not given.
        A ``sum_rows`` of the same batch just before ``update`` is reused, not recomputed.
        """
        missing = set(self.params) - set(grads)
        if missing:
            raise KeyError(f"no gradients given for {sorted(missing)}")
        rows, position = self._rows(indices)
        b = len(torch.as_tensor(indices).reshape(-1))
        for n, p in self.params.items():
            if grads[n].batch_size != b:
                raise ValueError(f"'{n}' has gradients for {grads[n].batch_size} examples but {b} indices were given")
            if grads[n].shape != p.shape:
                raise ValueError(
                    f"'{n}' has gradients of shape {tuple(grads[n].shape)}, the parameter {tuple(p.shape)}"
                )
        if position is not None:
            grads = {
                n: merge_examples(grads[n], position.to(grads[n].device), rows.numel(), self.block_size)
                for n in self.params
            }
        if not self.stores:
            self._allocate({n: grads[n] for n in self.params})
        rows = rows.to(self.device)
        totals, news, olds = [], [], []
        for n, store in self.stores.items():
            given = None if sums is None else sums.get(n)
            new, old = store.write(rows, grads[n], None if given is None else given.to(self.device))
            total = self._total[n]
            storage = total.untyped_storage().data_ptr()
            # In place, without temporaries; a sum that is the total itself must be copied first.
            new, old = (t.clone() if t.untyped_storage().data_ptr() == storage else t for t in (new, old))
            totals.append(total)
            news.append(new.to(total.dtype))
            olds.append(old.to(total.dtype))
        # total += new − old for all parameters at once (per element the same two roundings as one at a time)
        torch._foreach_add_(totals, news)
        torch._foreach_sub_(totals, olds)
        recent = [k for k, n in enumerate(self.stores) if n in self._recent]
        if recent:
            names = list(self.stores)
            torch._foreach_add_([self._recent[names[k]] for k in recent], [news[k] for k in recent])
            torch._foreach_sub_([self._recent[names[k]] for k in recent], [olds[k] for k in recent])
        # A non-finite row (an overflow in a low storage dtype, a diverging step) would leave a total
        # at inf/NaN for good: recompute such totals from the rows as stored (one host sync here). The
        # max-norm is non-finite exactly when an element is (NaN propagates).
        norms = torch.stack(torch._foreach_norm(totals, ord=math.inf))
        if not math.isfinite(float(norms.sum())):  # the sum of non-negative norms is finite iff each is
            for n, ok in zip(self.stores, torch.isfinite(norms).tolist()):
                if not ok:
                    self._recompute(n)
        self._since_fold += 1
        if self._since_fold >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """Add the float32 sums since the last fold to the float64 accumulator; reset ``total`` from it."""
        for n, recent in self._recent.items():
            self._exact[n].add_(recent)
            recent.zero_()
            self._total[n].copy_(self._exact[n])
        self._since_fold = 0

    def row_differences(
        self, indices: torch.Tensor, grads: Mapping[str, PerExampleGradient]
    ) -> dict[str, PerExampleGradient]:
        """Per parameter, G_j − h_j for the rows of a batch: its per-example gradients (merged into
        blocks with partition sampling) minus the rows as stored, one entry per row, not materialized
        where the layouts allow (SAGA's noise diagnostic). Call it before ``update``."""
        rows, position = self._rows(indices)
        if position is not None:
            grads = {n: merge_examples(grads[n], position.to(grads[n].device), rows.numel(), self.block_size)
                     for n in self.params}
        if not self.stores:
            return {n: grads[n] for n in self.params}
        rows = rows.to(self.device)
        return {n: combine([grads[n], store.gather(rows) * -1.0]) for n, store in self.stores.items()}

    # -- the packed fast path (SAGA on small models) --------------------------------------------

    def packed_rows(self) -> PackedRows | None:
        """The packed rows if the table is packed and its per-parameter stores and totals are still views of the
        packed tensors (vectorized chains stack the stores' tensors across chains; the per-parameter methods are
        then the valid ones), else None."""
        packed = self.packed
        if packed is None:
            return None
        stores, total, views = self.stores, self._total, self._total_views
        for slot in packed.slots:
            n = slot.name
            store = stores[n]
            if total[n] is not views[n] or (store.data if slot.factors is None else store.inputs).untyped_storage() \
                    .data_ptr() != packed.data.untyped_storage().data_ptr():
                return None
        return packed

    def batch_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows of a batch's examples, checked as ``update`` checks them, on the table's device (no
        partition: a packed table has none)."""
        rows, _ = self._rows(indices)
        return rows.to(self.device)

    @property
    def total_vector(self) -> torch.Tensor:
        """``total`` of every parameter as one vector in the packed order (the per-name ``total`` are its views)."""
        return self._vectors["total"]

    def update_packed(self, rows: torch.Tensor, new: torch.Tensor, new_sum: torch.Tensor | None,
                      old_sum: torch.Tensor) -> None:
        """`update` on a packed table (``packed_rows()`` not None): packed rows ``new [b, W]`` replace ``rows``
        (from `batch_rows`); ``new_sum``, their sum ``[P]`` in the packed order if the caller has it (used when
        rows are stored exactly); ``old_sum``, the sum of the rows being replaced, as stored."""
        data = self.packed.data
        data.index_copy_(0, rows, new.to(data.dtype))
        total = self._vectors["total"]
        if new_sum is None or data.dtype != total.dtype:  # sum what was stored (rounded to the storage dtype)
            new_sum = self.packed.row_sum(data.index_select(0, rows).to(total.dtype))
        # the same two roundings per element as `update`: total + new, then − old
        total.add_(new_sum).sub_(old_sum)
        recent = self._vectors.get("recent")
        if recent is not None:
            recent.add_(new_sum).sub_(old_sum)
        for store in self.stores.values():  # their memos describe rows as they were
            store._cached = store._gathered = None
        if not math.isfinite(float(total.abs().max())):  # NaN propagates through max
            for n in self.stores:
                if not bool(torch.isfinite(self._total[n]).all()):
                    self._recompute(n)
        self._since_fold += 1
        if self._since_fold >= FOLD_EVERY:
            self._fold()

    def sum_rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ of the stored rows of a batch's examples (with partition sampling: of its blocks)."""
        rows, _ = self._rows(indices)
        if not self.stores:
            return {n: torch.zeros_like(t) for n, t in self._total.items()}
        rows = rows.to(self.device)
        return {n: store.sum_rows(rows).to(self._total[n].dtype) for n, store in self.stores.items()}

    @property
    def total(self) -> dict[str, torch.Tensor]:
        """``Σ_j h_j`` over all rows, per parameter, in the parameters' dtype."""
        return self._total

    def recompute_total(self) -> None:
        """Recompute ``total`` from the stored rows, summed in float64 (clears the rounding of the updates)."""
        for n in self.stores:
            self._recompute(n)

    def _recompute(self, name: str) -> None:
        store, total = self.stores[name], self._exact.get(name, self._total[name])
        total.zero_()
        step = max(1, _RECOMPUTE_ELEMENTS // max(1, total.numel()))
        for s in range(0, self.num_rows, step):  # in chunks: the table may be close to free memory
            rows = torch.arange(s, min(s + step, self.num_rows), device=self.device)
            total.add_(store.rows_rep(rows, torch.float64).sum())
        if name in self._exact:
            self._recent[name].zero_()
            self._total[name].copy_(total)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (0 before the first update allocates them)."""
        return sum(s.nbytes for s in self.stores.values())

    def plan(self) -> dict[str, tuple[str, int]]:
        """Per parameter: (storage layout, bytes). Known once the first update has allocated the table."""
        if not self.stores:
            raise RuntimeError(
                "the table's layout is chosen at its first update; before that use "
                "vr_mcmc.storage.plan(model, example_input, num_data) to see the bytes of each strategy"
            )
        return {n: (s.kind, s.nbytes) for n, s in self.stores.items()}

    def state_dict(self) -> dict:
        """Everything needed to restore the table: configuration, row layouts, rows and totals."""
        return {
            "config": dict(num_data=self.num_data, policy=self.policy, rank=self.rank, block_size=self.block_size,
                           seed=self.seed, dtype=self.storage_dtype),
            "layouts": {n: vars(lay).copy() for n, lay in self.layouts.items()},
            "rows": {n: [t.clone() for t in s.state_tensors()] for n, s in self.stores.items()},
            "total": {n: t.clone() for n, t in self._total.items()},
            "accumulator": {n: (self._exact[n].clone(), self._recent[n].clone()) for n in self._exact},
            "since_fold": self._since_fold,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a table saved by `state_dict` into one built with the same configuration."""
        mine = dict(num_data=self.num_data, policy=self.policy, rank=self.rank, block_size=self.block_size,
                    seed=self.seed, dtype=self.storage_dtype)
        if dict(state["config"]) != mine:
            raise ValueError(f"the saved table was built with {dict(state['config'])}, this one with {mine}")
        if set(state["total"]) != set(self._total):
            raise ValueError("the saved table holds other parameters than this one")
        if not self.stores and state["layouts"]:
            self._allocate_layouts({n: RowLayout(**lay) for n, lay in state["layouts"].items()})
        for n, tensors in state["rows"].items():
            for mine_t, saved in zip(self.stores[n].state_tensors(), tensors):
                mine_t.copy_(saved)
        for n, t in state["total"].items():
            self._total[n].copy_(t)
        saved = state.get("accumulator", {})  # absent from tables saved before the float64 accumulator
        for n in self._exact:
            exact, recent = saved.get(n, (self._total[n], torch.zeros(())))
            self._exact[n].copy_(exact)
            self._recent[n].copy_(recent)
        self._since_fold = state.get("since_fold", 0)

    @property
    def lowrank_error(self) -> dict[str, torch.Tensor]:
        """Per low-rank parameter, the relative error ‖g − g_r‖/‖g‖ of each row of the last update."""
        return {n: s.last_error for n, s in self.stores.items() if isinstance(s, LowRankStore)}
