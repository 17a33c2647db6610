"""Compact representations of the B per-example gradients of one parameter.

Every representation stands for a stack ``g[0..B-1]`` of gradients of one parameter, with
``g_i`` the gradient of example i's loss ``ℓ_i`` (see DESIGN.md §2-3), and offers:

- ``dense()``: the stack as a tensor ``[B, *shape]`` (materializes it);
- ``sum(weights=None)``: ``Σ_i w_i g_i`` as a tensor of ``shape``, without materializing the stack;
- ``sq_norms()``: ``‖g_i‖²`` for each example, a tensor ``[B]``, without materializing where avoidable;
- ``index(sel)``: the representation of a subset of the examples;
- ``nbytes``: bytes held by the representation.

Representations of the same parameter add up exactly with :func:`combine` (used for tied
weights and modules called several times).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Dense", "Factored", "LowRank", "PerExampleGradient", "RowSparse", "combine"]

# Upper bound on the elements a temporary dense block may hold when a norm has to be computed
# densely: bounds peak memory whatever the batch size.
_CHUNK_ELEMENTS = 1 << 24


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor's distinct elements occupy (broadcast dimensions count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _batch_index(sel: Any, batch_size: int, device: torch.device) -> Any:
    """Normalize a selection of examples so that indexing keeps the batch dimension."""
    if isinstance(sel, torch.Tensor) and sel.dim() == 0 and not sel.dtype.is_floating_point:
        sel = int(sel)
    if isinstance(sel, numbers.Integral) and not isinstance(sel, bool):
        sel = int(sel)
        if not -batch_size <= sel < batch_size:
            raise IndexError(f"example index {sel} is out of range for a batch of {batch_size}")
        return slice(sel, sel + 1 if sel != -1 else None)
    if isinstance(sel, slice):
        return sel
    if isinstance(sel, (list, tuple)) and len(sel) == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    sel = torch.as_tensor(sel, device=device)
    if sel.dtype == torch.bool:
        if sel.shape != (batch_size,):
            raise IndexError(f"a boolean selection must have shape ({batch_size},), got {tuple(sel.shape)}")
        return sel
    if sel.dtype.is_floating_point or sel.dim() != 1:
        raise IndexError("select examples with an int, a slice, a 1-D integer tensor or a boolean mask")
    return sel


class PerExampleGradient:
    """Base class: the per-example gradients ``g_i`` of one parameter of shape ``shape``."""

    shape: torch.Size

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """All per-example gradients as one tensor ``[B, *shape]``."""
        raise NotImplementedError

    def sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i w_i g_i`` (``w_i = 1`` when ``weights`` is None), a tensor of ``shape``."""
        raise NotImplementedError

    def sq_norms(self) -> torch.Tensor:
        """Squared Euclidean norms ``‖g_i‖²``, a tensor ``[B]``."""
        raise NotImplementedError

    def index(self, sel: Any) -> PerExampleGradient:
        """The per-example gradients of the selected examples (int, slice, index tensor or mask)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.batch_size

    def __add__(self, other: PerExampleGradient) -> PerExampleGradient:
        return combine([self, other])

    def __mul__(self, scale: float) -> PerExampleGradient:
        """``scale · g_i`` for every example (scales the smallest tensor held)."""
        raise NotImplementedError

    def __rmul__(self, scale: float) -> PerExampleGradient:
        return self * scale

    def probe(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """k probes ``Σ_i u_jᵀ g_i w_j`` (j < k), each a sum of terms c; returns, per probe, Σ c and
        sqrt(Σ c²), and the number of terms in each sum.

        The parameter is viewed as a matrix [shape[0], rest]; ``left`` is [shape[0], k] and ``right``
        [rest, k]. For standard normal u, w each term has E[c²] = ‖(its part of) g‖², so the
        root-sum-square sets the scale of rounding error. It costs what the representation holds,
        never a materialization, so the engine can check every parameter against its gradient.
        """
        raise NotImplementedError

    @staticmethod
    def _terms(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Reduce terms [..., k] to per-probe sums and root-sum-squares."""
        # float64: squares of tiny (or huge) float32 terms must not underflow (or overflow).
        flat = terms.reshape(-1, terms.shape[-1]).double()
        return flat.sum(0), torch.linalg.vector_norm(flat, dim=0), flat.shape[0]

    def _check_weights(self, weights: torch.Tensor | None) -> torch.Tensor | None:
        if weights is None:
            return None
        weights = torch.as_tensor(weights, dtype=self.dtype, device=self.device)
        if weights.shape != (self.batch_size,):
            raise ValueError(
                f"weights must have shape ({self.batch_size},), one per example; got {tuple(weights.shape)}"
            )
        return weights

    def _chunked_sq_norms(self) -> torch.Tensor:
        """‖g_i‖² through dense blocks of at most _CHUNK_ELEMENTS elements."""
        per_example = max(1, math.prod(self.shape))
        step = max(1, _CHUNK_ELEMENTS // per_example)
        parts = [
            self.index(slice(s, s + step)).dense().reshape(-1, per_example).square().sum(1)
            for s in range(0, self.batch_size, step)
        ]
        if not parts:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, nbytes={self.nbytes})"
        )


class Dense(PerExampleGradient):
    """Per-example gradients held as one tensor: ``g_i = scale · G[i]`` for ``G [B, *shape]``.

    The scalar ``scale`` (from undoing a mean reduction) is applied lazily: ``sum`` and
    ``sq_norms`` fold it into their results and only ``dense()`` multiplies the tensor.
    Built with `from_terms` from per-position terms ``[B, T, *shape]`` (``G[i] = Σ_t terms[i, t]``,
    as for biases and normalization parameters), it keeps those terms, views of the batch's
    tensors, until the engine's consistency check (`vr_mcmc.per_example.consistency`) has compared
    Σ_i g_i with the gradient and released them: the size of what was summed, not of the sum, sets
    the scale of rounding error.
    """

    def __init__(self, grads: torch.Tensor, terms: torch.Tensor | None = None, scale: float = 1.0):
        if grads.dim() < 1:
            raise ValueError("Dense needs a tensor [B, *shape] with a leading batch dimension")
        self.grads = grads
        self.shape = grads.shape[1:]
        self.terms = terms
        self.scale = scale

    @classmethod
    def from_terms(cls, terms: torch.Tensor) -> Dense:
        """``g_i = Σ_t terms[i, t]`` for terms ``[B, T, *shape]``."""
        return cls(terms.sum(1), terms)

    @classmethod
    def zeros(cls, batch_size: int, shape: Sequence[int], *, dtype: torch.dtype, device: Any) -> Dense:
        """Zero gradients for every example, stored in one element (a broadcast view)."""
        return cls(torch.zeros((), dtype=dtype, device=device).expand(batch_size, *shape))

    @property
    def batch_size(self) -> int:
        return self.grads.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.grads.dtype

    @property
    def device(self) -> torch.device:
        return self.grads.device

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.grads)

    def dense(self) -> torch.Tensor:
        return self.grads if self.scale == 1 else self.grads * self.scale

    def sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self._check_weights(weights)
        total = self.grads.sum(0) if weights is None else torch.tensordot(weights, self.grads, dims=1)
        return total if self.scale == 1 else total * self.scale

    def sq_norms(self) -> torch.Tensor:
        norms = self.grads.reshape(self.batch_size, math.prod(self.shape)).square().sum(1)
        return norms if self.scale == 1 else norms * self.scale**2

    def index(self, sel: Any) -> Dense:
        sel = _batch_index(sel, self.batch_size, self.device)
        terms = None if self.terms is None else self.terms[sel]
        return Dense(self.grads[sel], terms, self.scale)

    def __mul__(self, scale: float) -> Dense:
        return Dense(self.grads, self.terms, self.scale * scale)

    def probe(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        src = self.grads.unsqueeze(1) if self.terms is None else self.terms
        b, t = src.shape[:2]
        (rows, k), cols = left.shape, right.shape[0]
        if cols == 1:
            # A vector parameter (bias, norm weight). A conv bias's terms are a transposed view of the
            # output gradient [B, C, L]: contracting in that layout is several times faster.
            src = src.reshape(b, t, rows)
            if src.stride(-1) != 1:
                terms = torch.matmul(left.t(), src.transpose(1, 2)).transpose(1, 2) * right[0]
            elif src.is_contiguous():
                terms = (src.view(b * t, rows) @ left) * right[0]  # one 2-D matmul: 3x faster than batched
            else:
                terms = torch.matmul(src, left) * right[0]
        else:
            g = src.reshape(b * t, rows, cols)
            # One 2-D matmul over the larger of the two dimensions, then a cheap reduction over the other.
            if rows >= cols:
                terms = ((g.transpose(1, 2).reshape(b * t * cols, rows) @ left).view(b * t, cols, k) * right).sum(1)
            else:
                terms = ((g.reshape(b * t * rows, cols) @ right).view(b * t, rows, k) * left).sum(1)
        value, rss, count = self._terms(terms)
        return value * self.scale, rss * abs(self.scale), count


class Factored(PerExampleGradient):
    """Per-example gradients of a weight used as a matrix: ``g_i = Σ_t dZ[i,t]ᵀ A[i,t]``.

    ``inputs`` A is ``[B, T, d_in]`` (layer inputs at T positions) and ``grad_outputs`` dZ is
    ``[B, T, d_out]`` (gradients of example i's loss at the layer outputs). A grouped
    convolution stores one factor pair per group, ``[B, G, T, d]``; the gradient is then the
    stack over groups, ``[G·d_out, d_in]``, reshaped to ``shape``.
    """

    def __init__(self, inputs: torch.Tensor, grad_outputs: torch.Tensor, shape: Sequence[int] | None = None):
        if inputs.dim() == 3:
            inputs = inputs.unsqueeze(1)
        if grad_outputs.dim() == 3:
            grad_outputs = grad_outputs.unsqueeze(1)
        if inputs.dim() != 4 or grad_outputs.dim() != 4 or inputs.shape[:3] != grad_outputs.shape[:3]:
            raise ValueError(
                "Factored needs inputs [B, (G,) T, d_in] and grad_outputs [B, (G,) T, d_out] with equal "
                f"B, G, T; got {tuple(inputs.shape)} and {tuple(grad_outputs.shape)}"
            )
        self.inputs = inputs
        self.grad_outputs = grad_outputs
        _, g, _, d_in = inputs.shape
        d_out = grad_outputs.shape[-1]
        self.shape = torch.Size(shape) if shape is not None else torch.Size((g * d_out, d_in))
        if math.prod(self.shape) != g * d_out * d_in:
            raise ValueError(f"shape {tuple(self.shape)} does not hold {g}×{d_out}×{d_in} numbers")

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.dtype

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def num_positions(self) -> int:
        return self.inputs.shape[2]

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.inputs) + _tensor_bytes(self.grad_outputs)

    def dense(self) -> torch.Tensor:
        g = torch.matmul(self.grad_outputs.transpose(-1, -2), self.inputs)  # [B, G, d_out, d_in]
        return g.reshape(self.batch_size, *self.shape)

    def sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self._check_weights(weights)
        dz = self.grad_outputs if weights is None else self.grad_outputs * weights.view(-1, 1, 1, 1)
        b, g, t, _ = self.inputs.shape
        # One matmul over the stacked (example, position) axis, per group.
        dz = dz.transpose(0, 1).reshape(g, b * t, self.grad_outputs.shape[-1])
        a = self.inputs.transpose(0, 1).reshape(g, b * t, self.inputs.shape[-1])
        return torch.matmul(dz.transpose(-1, -2), a).reshape(self.shape)

    def sq_norms(self) -> torch.Tensor:
        t, d_in, d_out = self.num_positions, self.inputs.shape[-1], self.grad_outputs.shape[-1]
        if t == 1:
            return (self.grad_outputs.square().sum(-1) * self.inputs.square().sum(-1)).sum((1, 2))
        if t * (d_in + d_out) <= d_in * d_out:
            # ‖Σ_t dz_t a_tᵀ‖² = Σ_{t,s} (dz_t·dz_s)(a_t·a_s): cheaper than materializing when T is small.
            gram_z = torch.matmul(self.grad_outputs, self.grad_outputs.transpose(-1, -2))
            gram_a = torch.matmul(self.inputs, self.inputs.transpose(-1, -2))
            return (gram_z * gram_a).sum((1, 2, 3))
        return self._chunked_sq_norms()

    def index(self, sel: Any) -> Factored:
        sel = _batch_index(sel, self.batch_size, self.device)
        return Factored(self.inputs[sel], self.grad_outputs[sel], self.shape)

    def probe(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        groups = self.inputs.shape[1]
        zu = torch.einsum("bgto,gok->bgtk", self.grad_outputs, left.view(groups, -1, left.shape[-1]))
        return self._terms(zu * (self.inputs @ right))

    def __mul__(self, scale: float) -> Factored:
        if self.grad_outputs.numel() <= self.inputs.numel():
            return Factored(self.inputs, self.grad_outputs * scale, self.shape)
        return Factored(self.inputs * scale, self.grad_outputs, self.shape)


class LowRank(PerExampleGradient):
    """Per-example gradients of rank at most r: ``g_i = U[i] V[i]`` with U ``[B, d_out, r]``, V ``[B, r, d_in]``."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, shape: Sequence[int] | None = None):
        if left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1]:
            raise ValueError(
                f"LowRank needs U [B, d_out, r] and V [B, r, d_in]; got {tuple(left.shape)} and "
                f"{tuple(right.shape)}"
            )
        self.left = left
        self.right = right
        self.shape = torch.Size(shape) if shape is not None else torch.Size((left.shape[1], right.shape[2]))
        if math.prod(self.shape) != left.shape[1] * right.shape[2]:
            raise ValueError(f"shape {tuple(self.shape)} does not match U {tuple(left.shape)}, V {tuple(right.shape)}")

    @property
    def batch_size(self) -> int:
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        return self.left.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.left) + _tensor_bytes(self.right)

    def dense(self) -> torch.Tensor:
        return torch.bmm(self.left, self.right).reshape(self.batch_size, *self.shape)

    def sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self._check_weights(weights)
        u = self.left if weights is None else self.left * weights.view(-1, 1, 1)
        b, d_out, r = u.shape
        u = u.transpose(0, 1).reshape(d_out, b * r)
        return torch.matmul(u, self.right.reshape(b * r, self.right.shape[-1])).reshape(self.shape)

    def sq_norms(self) -> torch.Tensor:
        # ‖U V‖_F² = Σ (UᵀU) ⊙ (V Vᵀ): r×r work per example.
        gram_left = torch.bmm(self.left.transpose(1, 2), self.left)
        return (gram_left * torch.bmm(self.right, self.right.transpose(1, 2))).sum((1, 2))

    def index(self, sel: Any) -> LowRank:
        sel = _batch_index(sel, self.batch_size, self.device)
        return LowRank(self.left[sel], self.right[sel], self.shape)

    def probe(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self._terms(torch.einsum("bor,ok->brk", self.left, left) * (self.right @ right))

    def __mul__(self, scale: float) -> LowRank:
        if self.left.numel() <= self.right.numel():
            return LowRank(self.left * scale, self.right, self.shape)
        return LowRank(self.left, self.right * scale, self.shape)


class RowSparse(PerExampleGradient):
    """Per-example gradients that touch few rows (Embedding): ``g_i[indices[i,t]] += values[i,t]``.

    ``indices`` is ``[B, T]`` (row of each lookup), ``values`` ``[B, T, D]``; rows looked up
    several times by one example add up. The gradient has shape ``[num_rows, D]``.
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, num_rows: int):
        if indices.dim() != 2 or values.dim() != 3 or indices.shape != values.shape[:2]:
            raise ValueError(
                f"RowSparse needs indices [B, T] and values [B, T, D]; got {tuple(indices.shape)}, "
                f"{tuple(values.shape)}"
            )
        self.indices = indices
        self.values = values
        self.num_rows = int(num_rows)
        self.shape = torch.Size((self.num_rows, values.shape[-1]))

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.indices) + _tensor_bytes(self.values)

    def _flat_rows(self) -> torch.Tensor:
        """Row of each lookup in the stacked [B·num_rows] layout."""
        offsets = torch.arange(self.batch_size, device=self.device).unsqueeze(1) * self.num_rows
        return (self.indices + offsets).reshape(-1)

    def dense(self) -> torch.Tensor:
        out = self.values.new_zeros(self.batch_size * self.num_rows, self.shape[1])
        out.index_add_(0, self._flat_rows(), self.values.reshape(-1, self.shape[1]))
        return out.view(self.batch_size, *self.shape)

    def sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self._check_weights(weights)
        vals = self.values if weights is None else self.values * weights.view(-1, 1, 1)
        out = self.values.new_zeros(self.shape)
        return out.index_add_(0, self.indices.reshape(-1), vals.reshape(-1, self.shape[1]))

    def sq_norms(self) -> torch.Tensor:
        # Sum repeated rows of each example first, then square: O(B·T·D), never B·num_rows·D.
        unique, inverse = torch.unique(self._flat_rows(), return_inverse=True)
        rows = self.values.new_zeros(unique.numel(), self.shape[1])
        rows.index_add_(0, inverse, self.values.reshape(-1, self.shape[1]))
        out = self.values.new_zeros(self.batch_size)
        return out.index_add_(0, torch.div(unique, self.num_rows, rounding_mode="floor"), rows.square().sum(1))

    def index(self, sel: Any) -> RowSparse:
        sel = _batch_index(sel, self.batch_size, self.device)
        return RowSparse(self.indices[sel], self.values[sel], self.num_rows)

    def probe(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self._terms(left[self.indices] * (self.values @ right))

    def __mul__(self, scale: float) -> RowSparse:
        return RowSparse(self.indices, self.values * scale, self.num_rows)


def _same_layout(reps: Sequence[PerExampleGradient]) -> bool:
    first = reps[0]
    if isinstance(first, Factored):
        return all(
            r.inputs.shape[1] == first.inputs.shape[1]
            and r.inputs.shape[3] == first.inputs.shape[3]
            and r.grad_outputs.shape[3] == first.grad_outputs.shape[3]
            for r in reps
        )
    return True


def combine(reps: Sequence[PerExampleGradient]) -> PerExampleGradient:
    """The exact per-example sum of several representations of one parameter.

    Same-type terms merge without materializing (factors concatenate along positions, low-rank
    factors along the rank, sparse rows along lookups); terms of different types fall back to
    a dense sum.
    """
    reps = list(reps)
    if not reps:
        raise ValueError("combine needs at least one representation")
    first = reps[0]
    for r in reps[1:]:
        if r.batch_size != first.batch_size or r.shape != first.shape:
            raise ValueError(
                f"cannot add per-example gradients of batch {r.batch_size}, shape {tuple(r.shape)} to "
                f"batch {first.batch_size}, shape {tuple(first.shape)}"
            )
    if len(reps) == 1:
        return first
    kinds = {type(r) for r in reps}
    if len(kinds) == 1 and _same_layout(reps):
        if isinstance(first, Factored):
            return Factored(
                torch.cat([r.inputs for r in reps], dim=2),
                torch.cat([r.grad_outputs for r in reps], dim=2),
                first.shape,
            )
        if isinstance(first, LowRank):
            return LowRank(torch.cat([r.left for r in reps], 2), torch.cat([r.right for r in reps], 1), first.shape)
        if isinstance(first, RowSparse):
            return RowSparse(
                torch.cat([r.indices for r in reps], 1), torch.cat([r.values for r in reps], 1), first.num_rows
            )
    if all(isinstance(r, Dense) and r.scale == first.scale for r in reps):
        total = reps[0].grads
        for r in reps[1:]:
            total = total + r.grads
        if all(r.terms is not None for r in reps):
            return Dense(total, torch.cat([r.terms for r in reps], 1), first.scale)
        return Dense(total, scale=first.scale)
    total = reps[0].dense()
    for r in reps[1:]:
        total = total + r.dense()
    return Dense(total)
