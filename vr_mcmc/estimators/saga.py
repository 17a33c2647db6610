"""SAGA and SAG: estimates from a table of one stored gradient per example (or per block)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..per_example import PerExampleGradients
from ..storage import GradientTable
from .base import Estimator, batch_sum, grad_or_zeros
from .noise import sampling_variance, variance_from_sums

__all__ = ["SAG", "SAGA"]


class SAGA(Estimator):
    """v = Σ_j h_j + (R/b)·Σ_{j∈S}(G_j − h_j), then h_j ← G_j for the rows j of the batch.

    Rows are examples (R = N, b = B, G_j = g_j) or, with a partitioned table, blocks (R blocks,
    b of them in the batch, G_j the block's summed gradient). Unbiased for any stored values
    because the table keeps ``total`` equal to the sum of the rows as stored (also when they are
    compressed). The rows start at zero (the first estimates are then plain minibatch ones) or
    are filled by one pass, `initialize`.

    ``table``: a `vr_mcmc.storage.GradientTable` built on the engine's model, or None to build
    one for the sampler's parameters with ``policy``, ``rank``, ``block_size``, ``dtype`` and
    ``seed`` (see `GradientTable`; ``block_size`` needs batches from a `vr_mcmc.data.BlockSampler`
    with the same seed).

    Parameters that ``engine`` has no per-example gradients for (not in its model, or not in
    the table) get the plain minibatch estimate, with a one-time warning.
    """

    needs_indices = True
    _row_scale_is_one = False  # SAG: v = the table's total after the update

    def __init__(
        self,
        table: GradientTable | None = None,
        engine: PerExampleGradients | None = None,
        *,
        policy: str = "auto",
        rank: int | None = None,
        block_size: int | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        if table is not None and not isinstance(table, GradientTable):
            raise TypeError(f"{type(self).__name__} takes a vr_mcmc.storage.GradientTable, got {type(table).__name__}")
        self.table = table
        self.engine = engine
        # Without a table, one is built at bind() for the sampler's parameters that the engine knows.
        self._table_options = dict(policy=policy, rank=rank, block_size=block_size, dtype=dtype, seed=seed)
        self._warned = False

    def bind(self, params, num_data, loss_reduction) -> None:
        super().bind(params, num_data, loss_reduction)
        if self.engine is None:
            raise ValueError(
                f"{type(self).__name__} needs the per-example engine: pass engine=PerExampleGradients(model) to the "
                "sampler (built before the first forward pass)"
            )
        if self.engine.loss_reduction != loss_reduction:
            raise ValueError(
                f"the engine was told loss_reduction={self.engine.loss_reduction!r} but the sampler "
                f"{loss_reduction!r}: give both the reduction of the loss you backpropagate"
            )
        if self.table is None:
            mine = {id(p) for p in self.params}
            named = {n: p for n, p in self.engine.parameter_names.items() if id(p) in mine}
            if not named:
                raise ValueError("none of the sampler's parameters belongs to the engine's model")
            self.table = GradientTable(named, num_data, **self._table_options)
        if self.table.num_data != num_data:
            raise ValueError(f"the gradient table has {self.table.num_data} examples but num_data={num_data}")
        names = {id(p): n for n, p in self.engine.parameter_names.items()}
        self.covered: list[tuple[str, torch.Tensor]] = []
        self.uncovered: list[torch.Tensor] = []
        for p in self.params:
            name = names.get(id(p))
            if name is not None and name in self.table.params:
                if self.table.params[name] is not p:
                    raise ValueError(f"the table's parameter '{name}' is not the sampler's: build the table on the "
                                     "same model as the engine")
                self.covered.append((name, p))
            else:
                self.uncovered.append(p)
        if not self.covered:
            raise ValueError("none of the sampler's parameters belongs to the engine's model and the table")
        missing = set(self.table.params) - {n for n, _ in self.covered}
        if missing:
            raise ValueError(f"the table holds parameters the sampler does not update: {sorted(missing)}")

    def _warn_uncovered(self) -> None:
        if self.uncovered and not self._warned:
            self._warned = True
            shapes = ", ".join(str(tuple(p.shape)) for p in self.uncovered)
            warnings.warn(
                f"{len(self.uncovered)} parameter(s) of shape {shapes} have no per-example gradients from the "
                f"engine (they are not in its model); they get the plain minibatch estimate, not "
                f"{type(self).__name__}'s variance reduction",
                stacklevel=4,
            )

    def check_grad_is_the_batchs(self) -> None:
        """Refuses a ``.grad`` that is not this batch's gradient: SAGA writes its estimate into ``.grad``, so a
        forgotten ``zero_grad()`` adds the last estimate (N/B times a gradient) to the next batch's gradient and
        the chain blows up within ~100 steps. Compared with the gradient the engine's hooks saw in this batch's
        backward, on up to 64 evenly spaced entries per parameter (one host sync for all)."""
        seen = self.engine.batch_gradients()
        gaps, scales = [], []
        for name, p in self.covered:
            mine = seen.get(name)
            if mine is None or p.grad is None or mine.is_sparse or p.grad.is_sparse or p.grad.numel() == 0:
                continue
            g, c = p.grad.reshape(-1), mine.reshape(-1)
            stride = max(1, g.numel() // 64)
            g, c = g[::stride], c[::stride].to(g.dtype)
            gaps.append((g - c).abs().max())
            scales.append(g.abs().max() + c.abs().max())
        if not gaps:
            return
        gap, scale = torch.stack(gaps), torch.stack(scales)
        bad = (gap > 1e-3 * scale) & gap.isfinite()
        if bool(bad.any()):
            raise ValueError(
                f"{type(self).__name__}: .grad does not hold this batch's gradient (it differs from the gradient "
                "of the backward pass the per-example engine saw). Call sampler.zero_grad() (or model.zero_grad()) "
                "before each loss.backward(): the sampler writes its estimate into .grad, so without zero_grad() "
                "the next backward adds to it and the chain diverges. Changing .grad between backward() and "
                "step() (clipping, scaling) is not supported either: the estimator uses the engine's per-example "
                "gradients of the same loss."
            )

    def estimate(self, indices, closure):
        packed = self.table.packed_rows()
        if packed is not None and not self.uncovered:
            return self._estimate_packed(indices, packed)
        b = int(indices.numel())
        # A forgotten zero_grad() repeats on every step: checking the first steps and then every 64th finds it
        # before the chain has diverged, at a negligible share of the step (every step: 10% of a small model's);
        # the engine's consistency check on the same schedule (every step: more than an SGLD step on the demo MLP)
        due = self.spot_check_due()
        if due:
            self.check_grad_is_the_batchs()
        reps = self._collect(due)
        old = self.table.sum_rows(indices)
        if self._row_scale_is_one:
            scale = 1.0
        elif self.table.partition is not None:
            scale = self.table.num_rows / self.table.partition.rows(indices).numel()
        else:
            scale = self.num_data / b
        diagnose = self.diagnose and not self._row_scale_is_one
        if diagnose:  # SAGA's noise: the spread of g_j − h_j over the batch's rows
            diffs = self.table.row_differences(indices, reps)
        # All covered parameters at once (torch._foreach_*: the same arithmetic per element as one at a time,
        # without a Python round trip per parameter and operation).
        names = [n for n, _ in self.covered]
        grads = [grad_or_zeros(p) for _, p in self.covered]
        totals = [self.table.total[n] for n in names]
        olds = [old[n] for n in names]
        # Σ_{i∈S} g_i: B·(the gradient of the batch mean), or the gradient of the batch sum
        sums = torch._foreach_mul(grads, b) if self.loss_reduction == "mean" else list(grads)
        # s − h_S before update() moves total; new tensors, since s may alias g (sum reduction)
        moved = torch._foreach_sub([sm.to(t.dtype) for sm, t in zip(sums, totals)], olds)
        estimates = torch._foreach_add(totals, moved, alpha=scale)
        for (_, p), g, v in zip(self.covered, grads, estimates):
            p.grad = v.to(g.dtype)
        self._warn_uncovered()
        minibatch = self._scale(b)
        for p in self.uncovered:
            grad_or_zeros(p).mul_(minibatch)
        info = {"grad_evals": b}
        if diagnose:
            var = sampling_variance([diffs[n] for n in names], moved, self.table.num_rows)
            info["noise_var"] = self._align(var)
        self.table.update(indices, reps, dict(zip(names, sums)))
        return info

    def _estimate_packed(self, indices: torch.Tensor, packed: Any) -> dict[str, Any]:
        """`estimate` on a packed table (`GradientTable.packed_rows`): the same arithmetic on all parameters at
        once, packed rows ``[b, W]`` and ``[P]`` sums: a fixed handful of tensor operations a step, plus one matmul
        per factored parameter."""
        b = int(indices.numel())
        due = self.spot_check_due()
        if due:
            self.check_grad_is_the_batchs()
        reps = self._collect(due)
        table = self.table
        layout = self._packed_layout(packed)
        params = layout["params"]
        total = table.total_vector
        rows = table.batch_rows(indices)
        old = packed.data.index_select(0, rows).to(total.dtype)  # [b, W]
        old_sum = packed.row_sum(old)
        # Σ_{i∈S} g_i: B·(the gradient of the batch mean), or the gradient of the batch sum
        sums = torch.cat([grad_or_zeros(p).reshape(-1) for p in params]).to(total.dtype)
        if self.loss_reduction == "mean":
            sums.mul_(b)
        new = packed.pack(reps, total.dtype)  # first: a batch the layout cannot take raises before .grad changes
        moved = sums - old_sum
        scale = 1.0 if self._row_scale_is_one else self.num_data / b
        estimate = torch.add(total, moved, alpha=scale)
        for p, v, shape in zip(params, estimate.split(layout["sizes"]), layout["shapes"]):
            p.grad = v.view(shape) if v.dtype == p.dtype else v.view(shape).to(p.dtype)
        info: dict[str, Any] = {"grad_evals": b}
        if self.diagnose and not self._row_scale_is_one:  # SAGA's noise: the spread of g_j − h_j over the batch
            if b < 2:
                var = torch.full((len(params),), float("nan"), dtype=torch.float64)
            else:
                squares = packed.difference_sq_norms(new, old).to(torch.float64)
                totals = packed.per_parameter(moved.to(torch.float64).square())
                var = variance_from_sums(squares, totals, b, table.num_rows).cpu()
            info["noise_var"] = var[layout["to_covered"]]
        table.update_packed(rows, new, sums, old_sum)
        return info

    def _packed_layout(self, packed: Any) -> dict[str, Any]:
        """The sampler's parameters in the packed order, their sizes and shapes, and the permutation from that
        order to ``self.covered``'s (kept while the table's packed rows are the same object)."""
        memo = getattr(self, "_packed_memo", None)
        if memo is not None and memo[0] is packed:
            return memo[1]
        by_name = dict(self.covered)
        params = [by_name[n] for n in packed.order]
        position = {n: k for k, n in enumerate(packed.order)}
        layout = {"params": params, "sizes": [p.numel() for p in params], "shapes": [p.shape for p in params],
                  "to_covered": torch.tensor([position[n] for n, _ in self.covered], dtype=torch.long)}
        self._packed_memo = (packed, layout)
        return layout

    def _align(self, covered: torch.Tensor) -> torch.Tensor:
        """Per-covered-parameter values placed in the order of ``self.params`` (NaN for the uncovered)."""
        if not self.uncovered:
            return covered
        position = {id(p): k for k, (_, p) in enumerate(self.covered)}
        out = torch.full((len(self.params),), float("nan"), dtype=covered.dtype)
        for k, p in enumerate(self.params):
            if id(p) in position:
                out[k] = covered[position[id(p)]]
        return out

    @torch.no_grad()
    def initialize(self, loader: Iterable, loss_fn: Callable[..., torch.Tensor]) -> None:
        """Fill every row with one pass: ``loader`` yields ``(idx, *data)`` (e.g. over a
        `vr_mcmc.data.IndexedDataset`), ``loss_fn(*data)`` returns the batch loss as backpropagated
        in training. Leaves ``.grad`` of the parameters at None."""
        seen = torch.zeros(self.num_data, dtype=torch.bool)
        for batch in loader:
            idx, *data = batch
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
            for _, p in self.covered:
                p.grad = None
            with torch.enable_grad():
                loss_fn(*data).backward()
            reps = self.engine.collect()
            sums = {n: batch_sum(grad_or_zeros(p), idx.numel(), self.loss_reduction) for n, p in self.covered}
            self.table.update(idx, reps, sums)
            seen[idx] = True
        for p in self.params:
            p.grad = None
        if not bool(seen.all()):
            warnings.warn(
                f"initialize() visited {int(seen.sum())} of the {self.num_data} examples; the other rows stay zero "
                "(still unbiased, but less variance reduction at first)",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table.load_state_dict(state["table"])

    def __repr__(self) -> str:
        if self.table is None:
            return f"{type(self).__name__}(policy={self._table_options['policy']!r})"
        return f"{type(self).__name__}(table={self.table.policy!r}, rows={self.table.num_rows})"


class SAG(SAGA):
    """v = Σ_j h_j after writing the batch's rows: lower variance than SAGA but biased
    (E[v] ≠ ∇U), so for optimization (``temperature=0``) only."""

    unbiased = False
    _row_scale_is_one = True
