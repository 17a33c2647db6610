"""Row stores for one parameter of a gradient table, one storage layout each.

A store keeps R rows (one per example, or per partition block) of one parameter's gradient.
``write(rows, rep)`` replaces those rows with the representation's per-example gradients and
returns the sums of the new and of the old stored rows, computed from what was *stored* (after
compression and rounding to the storage dtype), in the compute dtype: adding their difference
is what keeps a table's ``total`` equal to the sum of its rows (DESIGN.md §2, the SAGA invariant).
"""

from __future__ import annotations

import math

import torch

from ..per_example import Dense, Factored, LowRank, PerExampleGradient, RowSparse
from .svd import randomized_svd

__all__ = ["DenseStore", "FactoredStore", "LowRankStore", "SparseStore", "Store"]

_CHUNK_ELEMENTS = 1 << 24  # bound on temporary dense blocks when compressing


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Store:
    """Base class: R rows of a parameter of shape ``shape``."""

    kind = ""

    def __init__(self, shape: torch.Size, compute_dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.compute_dtype = compute_dtype
        # (rows, their version, their sum, the sum's version) since the last write
        self._cached: tuple[torch.Tensor, int, torch.Tensor, int] | None = None
        self._gathered: tuple | None = None  # (rows, the stored tensors' versions, rows_rep(rows)); see gather
        self._lossless: bool | None = None

    @property
    def lossless(self) -> bool:
        """Whether a row is stored exactly as given (no compression, no rounding to a lower dtype)."""
        if self._lossless is None:  # fixed at construction
            self._lossless = self.kind != "lowrank" and all(
                t.dtype == self.compute_dtype or not t.is_floating_point() for t in self._tensors())
        return self._lossless

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the rows (saved and restored in place by the table's state dict)."""
        return self._tensors()

    def rows_rep(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> PerExampleGradient:
        """The stored rows as a representation in ``dtype`` (default: the compute dtype)."""
        raise NotImplementedError

    def gather(self, rows: torch.Tensor) -> PerExampleGradient:
        """``rows_rep(rows)`` in the compute dtype, kept for the same ``rows`` tensor until the stored rows
        change (their version counters): SAGA reads a batch's old rows for their sum and for its noise
        diagnostic."""
        tensors = self._tensors()
        if torch.is_inference_mode_enabled() or rows.is_inference() or any(t.is_inference() for t in tensors):
            # no version counters to go by
            return self.rows_rep(rows)
        versions = tuple(t._version for t in tensors)
        memo = self._gathered
        if memo is not None and memo[0] is rows and memo[1] == versions:
            return memo[2]
        rep = self.rows_rep(rows)
        self._gathered = (rows, versions, rep)
        return rep

    def sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        total = self.gather(rows).sum()
        # SAGA asks for Σ of a batch's old rows, then overwrites those rows: keep the sum for write()
        # (its version counter tells if the caller modified it in place since; inference tensors have
        # no version counter, so those are not kept).
        # The rows tensor itself with its version counter, not a copy: unchanged since, it holds the same rows.
        cached = None if total.is_inference() or rows.is_inference() else (rows, rows._version, total, total._version)
        self._cached = cached
        return total

    def write(
        self, rows: torch.Tensor, rep: PerExampleGradient, new_sum: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``rep``'s gradients in ``rows``; returns (Σ new stored, Σ old stored) over them.

        ``new_sum``, Σ of ``rep``'s gradients if the caller has it, replaces recomputing Σ of the
        new rows when they are stored exactly (a lossless store).
        """
        cached = self._cached
        if (cached is not None and cached[0]._version == cached[1] and cached[2]._version == cached[3]
                and (cached[0] is rows or (cached[0].shape == rows.shape and torch.equal(cached[0], rows)))):
            old = cached[2]
        else:
            old = self.rows_rep(rows).sum()
        self._cached = None
        self._gathered = None
        self._put(rows, rep)
        if new_sum is not None and self.lossless:
            return new_sum, old
        return self.rows_rep(rows).sum(), old

    def _put(self, rows: torch.Tensor, rep: PerExampleGradient) -> None:
        raise NotImplementedError


class DenseStore(Store):
    """Rows ``[R, *shape]``: the paper's naive table."""

    kind = "dense"

    def __init__(self, num_rows: int, shape, dtype, device, compute_dtype, data: torch.Tensor | None = None):
        super().__init__(shape, compute_dtype)
        # ``data``: a given [R, *shape] tensor to keep the rows in (a view of a packed table's columns)
        self.data = torch.zeros(num_rows, *shape, dtype=dtype, device=device) if data is None else data

    @staticmethod
    def bytes_needed(num_rows: int, shape, dtype: torch.dtype) -> int:
        return num_rows * math.prod(shape) * _itemsize(dtype)

    def _tensors(self):
        return [self.data]

    def rows_rep(self, rows, dtype=None):
        return Dense(self.data[rows].to(dtype or self.compute_dtype))

    def _put(self, rows, rep):
        self.data[rows] = rep.dense().to(self.data)


class FactoredStore(Store):
    """Rows as factors A ``[R, G, T, d_in]`` and dZ ``[R, G, T, d_out]``: T·(d_in + d_out) numbers a row."""

    kind = "factored"

    def __init__(self, num_rows: int, shape, groups: int, positions: int, d_in: int, d_out: int, dtype, device,
                 compute_dtype, factors: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__(shape, compute_dtype)
        if factors is not None:  # given tensors to keep the rows in (views of a packed table's columns)
            self.inputs, self.grad_outputs = factors
        else:
            self.inputs = torch.zeros(num_rows, groups, positions, d_in, dtype=dtype, device=device)
            self.grad_outputs = torch.zeros(num_rows, groups, positions, d_out, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(num_rows: int, groups: int, positions: int, d_in: int, d_out: int, dtype) -> int:
        return num_rows * groups * positions * (d_in + d_out) * _itemsize(dtype)

    def _tensors(self):
        return [self.inputs, self.grad_outputs]

    def rows_rep(self, rows, dtype=None):
        dtype = dtype or self.compute_dtype
        return Factored(self.inputs[rows].to(dtype), self.grad_outputs[rows].to(dtype), self.shape)

    def _put(self, rows, rep):
        if not isinstance(rep, Factored) or rep.inputs.shape[1:] != self.inputs.shape[1:] \
                or rep.grad_outputs.shape[1:] != self.grad_outputs.shape[1:]:
            raise ValueError(
                f"a factored table row holds factors {tuple(self.inputs.shape[1:])} and "
                f"{tuple(self.grad_outputs.shape[1:])}; got {rep!r}. Keep the number of positions fixed "
                "(pad sequences to one length) or use policy='dense'"
            )
        # Factored gradients scale their smaller factor; copy both as they are.
        self.inputs[rows] = rep.inputs.to(self.inputs)
        self.grad_outputs[rows] = rep.grad_outputs.to(self.grad_outputs)


class SparseStore(Store):
    """Rows of an embedding table as T looked-up rows and their values: T·(D + 1) numbers a row."""

    kind = "sparse"

    def __init__(self, num_rows: int, shape, lookups: int, dtype, device, compute_dtype):
        super().__init__(shape, compute_dtype)
        self.indices = torch.zeros(num_rows, lookups, dtype=torch.long, device=device)
        self.values = torch.zeros(num_rows, lookups, shape[1], dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(num_rows: int, shape, lookups: int, dtype) -> int:
        return num_rows * lookups * (8 + shape[1] * _itemsize(dtype))

    def _tensors(self):
        return [self.indices, self.values]

    def rows_rep(self, rows, dtype=None):
        return RowSparse(self.indices[rows], self.values[rows].to(dtype or self.compute_dtype), self.shape[0])

    def _put(self, rows, rep):
        if not isinstance(rep, RowSparse) or rep.indices.shape[1] != self.indices.shape[1]:
            raise ValueError(
                f"a sparse table row holds {self.indices.shape[1]} lookups; got {rep!r}. Keep the number of "
                "lookups per example fixed or use policy='dense'"
            )
        self.indices[rows] = rep.indices.to(self.indices.device)
        self.values[rows] = rep.values.to(self.values)


class LowRankStore(Store):
    """Rows of rank at most r: U·S ``[R, m, r]`` and Vᵀ ``[R, r, n]`` of each row's truncated SVD.

    The parameter is viewed as a matrix [shape[0], rest]. ``last_error`` holds, for the rows of
    the last write, the relative Frobenius error ‖g − g_r‖/‖g‖ the truncation dropped.
    """

    kind = "lowrank"

    def __init__(self, num_rows: int, shape, rank: int, dtype, device, compute_dtype, *, seed: int = 0):
        super().__init__(shape, compute_dtype)
        self.m = shape[0]
        self.n = math.prod(shape) // self.m
        self.rank = min(rank, self.m, self.n)
        self.left = torch.zeros(num_rows, self.m, self.rank, dtype=dtype, device=device)
        self.right = torch.zeros(num_rows, self.rank, self.n, dtype=dtype, device=device)
        self.last_error = torch.zeros(0, dtype=compute_dtype)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @staticmethod
    def bytes_needed(num_rows: int, shape, rank: int, dtype) -> int:
        m = shape[0]
        n = math.prod(shape) // m
        return num_rows * min(rank, m, n) * (m + n) * _itemsize(dtype)

    def _tensors(self):
        return [self.left, self.right]

    def rows_rep(self, rows, dtype=None):
        dtype = dtype or self.compute_dtype
        return LowRank(self.left[rows].to(dtype), self.right[rows].to(dtype), self.shape)

    def _put(self, rows, rep):
        b = rep.batch_size
        step = max(1, _CHUNK_ELEMENTS // max(1, self.m * self.n))
        errors = []
        for s in range(0, b, step):
            chunk = rep.index(slice(s, s + step)).dense()
            matrices = chunk.reshape(-1, self.m, self.n).to(self.left.device, self.compute_dtype)
            u, sv, vh = randomized_svd(matrices, self.rank, generator=self.generator)
            self.left[rows[s : s + step]] = (u * sv.unsqueeze(1)).to(self.left.dtype)
            self.right[rows[s : s + step]] = vh.to(self.right.dtype)
            # The residual itself, not ‖M‖² − ‖M_r‖², which cancels to noise when the error is tiny.
            residual = torch.linalg.matrix_norm(matrices - (u * sv.unsqueeze(1)) @ vh)
            errors.append(residual / torch.linalg.matrix_norm(matrices).clamp_min(torch.finfo(matrices.dtype).tiny))
        self.last_error = torch.cat(errors) if errors else self.last_error
