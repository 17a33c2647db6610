"""The packed layout of a gradient table: every parameter's stored row side by side in one ``[rows, W]`` tensor.

On a small model the cost of a SAGA step is not arithmetic but the number of tensor operations, several per
parameter and per table operation (gather the batch's rows, sum them, scatter the new ones, move the total). Packed,
a batch's old rows are one gather and its new rows one scatter, whatever the number of parameters; the totals are
one vector. Each parameter keeps its exact layout (its columns hold the dense gradient, or a Linear-type layer's
factors A and dZ), so packing costs no memory; the per-parameter stores are views of the packed tensor, and the
table's per-parameter API reads and writes the same memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..per_example import Factored, PerExampleGradient

__all__ = ["PackedRows", "flat_vector"]


def flat_vector(shapes: Mapping[str, torch.Size], dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A zero vector of all the shapes' elements and, per name (in order), its view shaped as that entry."""
    vector = torch.zeros(sum(math.prod(s) for s in shapes.values()), dtype=dtype, device=device)
    views, start = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        views[name] = vector[start:start + n].view(shape)
        start += n
    return vector, views


@dataclass(frozen=True)
class _Slot:
    """Where one parameter's row lives in a packed row: columns [start, stop); factored: A's first, then dZ's."""

    name: str
    shape: torch.Size
    start: int
    stop: int
    factors: tuple[int, int, int, int] | None = None  # (groups, positions, d_in, d_out) when stored factored


class PackedRows:
    """``data [rows, W]``: row j holds the stored row of every parameter. ``order``: the parameters, dense ones
    first (so their columns, and their entries of a vector in this order, are one contiguous block)."""

    def __init__(self, layouts: Mapping[str, tuple[str, torch.Size, tuple | None]], num_rows: int,
                 dtype: torch.dtype, device: torch.device):
        dense = [n for n, (kind, _, _) in layouts.items() if kind == "dense"]
        factored = [n for n, (kind, _, _) in layouts.items() if kind == "factored"]
        self.order = dense + factored
        self.slots: list[_Slot] = []
        start = 0
        for name in self.order:
            kind, shape, factors = layouts[name]
            width = math.prod(shape) if kind == "dense" else factors[0] * factors[1] * (factors[2] + factors[3])
            self.slots.append(_Slot(name, torch.Size(shape), start, start + width,
                                    None if kind == "dense" else tuple(factors)))
            start += width
        self.width = start
        self.dense_width = sum(math.prod(s.shape) for s in self.slots if s.factors is None)  # columns = entries
        self.data = torch.zeros(num_rows, self.width, dtype=dtype, device=device)
        # the position (in ``order``) of the parameter of each entry of a [P] vector, and of each dense column
        sizes = torch.tensor([math.prod(slot.shape) for slot in self.slots], device=device)
        self.segments = torch.repeat_interleave(torch.arange(len(self.slots), device=device), sizes)
        self.num_dense = sum(1 for slot in self.slots if slot.factors is None)

    def views(self, name: str) -> tuple[torch.Tensor, ...]:
        """The rows of one parameter as its store holds them: ``([R, *shape],)`` dense, ``(A [R, G, T, d_in],
        dZ [R, G, T, d_out])`` factored; views of ``data``."""
        slot = next(s for s in self.slots if s.name == name)
        return self._split(self.data, slot)

    @staticmethod
    def _split(rows: torch.Tensor, slot: _Slot) -> tuple[torch.Tensor, ...]:
        block = rows[:, slot.start:slot.stop]
        if slot.factors is None:
            return (block.reshape(rows.shape[0], *slot.shape),)
        g, t, d_in, d_out = slot.factors
        cut = g * t * d_in
        return (block[:, :cut].reshape(rows.shape[0], g, t, d_in), block[:, cut:].reshape(rows.shape[0], g, t, d_out))

    def pack(self, reps: Mapping[str, PerExampleGradient], dtype: torch.dtype) -> torch.Tensor:
        """``[b, W]``: a batch's per-example gradients (``engine.collect()``) as packed rows."""
        parts = []
        for slot in self.slots:
            rep = reps[slot.name]
            if slot.factors is None:
                parts.append(rep.dense().reshape(rep.batch_size, -1))
            elif isinstance(rep, Factored) and tuple(rep.inputs.shape[1:]) == slot.factors[:3] \
                    and rep.grad_outputs.shape[-1] == slot.factors[3]:
                parts.append(rep.inputs.reshape(rep.batch_size, -1))
                parts.append(rep.grad_outputs.reshape(rep.batch_size, -1))
            else:
                raise ValueError(
                    f"'{slot.name}' is stored as factors {slot.factors[:3]} and d_out {slot.factors[3]}; got {rep!r}. "
                    "Keep the number of positions fixed (pad sequences to one length) or use policy='dense'")
        return torch.cat(parts, 1).to(dtype)

    def row_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """``[P]`` in ``order``: the sum over a batch of packed rows ``[b, W]`` of each parameter's gradient."""
        b = rows.shape[0]
        parts = [rows[:, :self.dense_width].sum(0)] if self.dense_width else []
        for slot in self.slots:
            if slot.factors is None:
                continue
            g, t, d_in, _ = slot.factors
            if g == t == 1:  # a plain Linear layer: Σ_i dZ_iᵀ A_i is one mm on the column blocks, no copies
                cut = slot.start + d_in
                parts.append(torch.mm(rows[:, cut:slot.stop].t(), rows[:, slot.start:cut]).reshape(-1))
                continue
            a, z = self._split(rows, slot)
            # Σ_i Σ_t dZ_itᵀ A_it: one matmul over the stacked (example, position) axis, per group
            a = a.transpose(0, 1).reshape(g, b * t, a.shape[-1])
            z = z.transpose(0, 1).reshape(g, b * t, z.shape[-1])
            parts.append(torch.matmul(z.transpose(-1, -2), a).reshape(-1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def per_parameter(self, vector: torch.Tensor) -> torch.Tensor:
        """``[len(order)]``: the sums of a ``[P]`` vector's entries (in ``order``) over each parameter."""
        out = torch.zeros(len(self.slots), dtype=vector.dtype, device=vector.device)
        return out.index_add_(0, self.segments, vector)

    def difference_sq_norms(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``[len(order)]``, float64: Σ_i ‖g_i − h_i‖² per parameter over a batch's packed rows ``new`` (g) and
        ``old`` (h)."""
        squares = []
        if self.dense_width:  # the dense parameters' columns are the first dense_width, in order
            columns = (new[:, :self.dense_width] - old[:, :self.dense_width]).to(torch.float64).square().sum(0)
            out = torch.zeros(self.num_dense, dtype=columns.dtype, device=columns.device)
            squares.append(out.index_add_(0, self.segments[:self.dense_width], columns))
        for slot in self.slots[self.num_dense:]:
            (a, z), (a0, z0) = self._split(new, slot), self._split(old, slot)
            g, t, d_in, d_out = slot.factors
            b = new.shape[0]
            # g_i − h_i = Σ over 2T positions of l ⊗ r, with l = [dZ, −dZ0] and r = [A, A0]; in float64, since
            # g_i ≈ h_i is SAGA's regime: the difference of products cancels (float32 would keep ~1e-7 of ‖g_i‖)
            left = torch.cat([z, -z0], 2).reshape(b * g, 2 * t, d_out).to(torch.float64)
            right = torch.cat([a, a0], 2).reshape(b * g, 2 * t, d_in).to(torch.float64)
            if 2 * t * (d_in + d_out) <= d_in * d_out:  # ‖Σ_t l_t r_tᵀ‖² = Σ_{t,s} (l_t·l_s)(r_t·r_s): no product
                gram = torch.bmm(left, left.transpose(1, 2)) * torch.bmm(right, right.transpose(1, 2))
                squares.append(gram.sum().reshape(1))
            else:
                squares.append(torch.bmm(left.transpose(1, 2), right).square().sum().reshape(1))
        return torch.cat(squares)
