"""Bytes of each gradient-table strategy, per layer and in total, without allocating a table.

Strategies (the columns of the seed paper's Table 1, plus the cheapest exact one):

- ``naive``: one dense gradient per example, N·P numbers;
- ``factored``: Linear-type layers as factors, N·T·(d_in + d_out); other layers naive;
- ``auto``: per parameter the cheapest exact layout (factors, embedding lookups or dense);
- ``rank-r``: rank-r truncated SVD of each example's gradient matrix, N·r·(m + n), unless an exact
  layout is no larger (high ranks, embeddings); vectors naive;
- ``partition-k``: one dense row per block of k examples, ⌈N/k⌉·P;
- ``rank-r + partition-k``: rank-r rows per block, ⌈N/k⌉·r·(m + n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..per_example import Factored, PerExampleGradient, PerExampleGradients, RowSparse
from ..per_example.fallback import flat_tensors
from .stores import DenseStore, FactoredStore, LowRankStore, SparseStore

__all__ = ["MemoryPlan", "RowLayout", "available_bytes", "plan"]


@dataclass(frozen=True)
class RowLayout:
    """What one row of a parameter's gradient looks like, as the engine represents it."""

    shape: torch.Size
    kind: str  # "factored", "sparse" or "dense"
    groups: int = 1
    positions: int = 1
    d_in: int = 0
    d_out: int = 0
    lookups: int = 0

    @classmethod
    def of(cls, rep: PerExampleGradient) -> RowLayout:
        if isinstance(rep, Factored):
            _, g, t, d_in = rep.inputs.shape
            return cls(rep.shape, "factored", g, t, d_in, rep.grad_outputs.shape[-1])
        if isinstance(rep, RowSparse):
            return cls(rep.shape, "sparse", lookups=rep.indices.shape[1])
        return cls(rep.shape, "dense")

    def bytes(self, layout: str, num_rows: int, dtype: torch.dtype, rank: int = 1) -> int:
        """Bytes of ``num_rows`` rows stored as ``layout`` ('dense', 'factored', 'sparse', 'lowrank')."""
        if layout == "factored":
            return FactoredStore.bytes_needed(num_rows, self.groups, self.positions, self.d_in, self.d_out, dtype)
        if layout == "sparse":
            return SparseStore.bytes_needed(num_rows, self.shape, self.lookups, dtype)
        if layout == "lowrank":
            return LowRankStore.bytes_needed(num_rows, self.shape, rank, dtype)
        return DenseStore.bytes_needed(num_rows, self.shape, dtype)

    def exact_layouts(self) -> list[str]:
        return ["dense"] + ([self.kind] if self.kind != "dense" else [])

    def cheapest_exact(self, num_rows: int, dtype: torch.dtype) -> str:
        return min(self.exact_layouts(), key=lambda k: self.bytes(k, num_rows, dtype))

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    def lowrank_or_exact(self, num_rows: int, dtype: torch.dtype, rank: int) -> str:
        """Rank-r rows for weight matrices, unless an exact layout is no larger (high rank, embeddings)."""
        exact = self.cheapest_exact(num_rows, dtype)
        if self.is_matrix and self.bytes("lowrank", num_rows, dtype, rank) < self.bytes(exact, num_rows, dtype):
            return "lowrank"
        return exact


def strategy_bytes(layout: RowLayout, strategy: str, num_data: int, dtype: torch.dtype, rank: int,
                   block_size: int) -> int:
    """Bytes of one parameter under one of the planner's strategies (see the module docstring)."""
    blocks = -(-num_data // block_size)
    if strategy == "naive":
        return layout.bytes("dense", num_data, dtype)
    if strategy == "factored":
        return layout.bytes("factored" if layout.kind == "factored" else "dense", num_data, dtype)
    if strategy == "auto":
        return layout.bytes(layout.cheapest_exact(num_data, dtype), num_data, dtype)
    if strategy == "rank":
        return layout.bytes(layout.lowrank_or_exact(num_data, dtype, rank), num_data, dtype, rank)
    if strategy == "partition":
        return layout.bytes("dense", blocks, dtype)
    if strategy == "rank+partition":
        blocked = RowLayout(layout.shape, "dense")  # a block row is a sum: kept dense or low-rank
        return blocked.bytes(blocked.lowrank_or_exact(blocks, dtype, rank), blocks, dtype, rank)
    raise ValueError(f"unknown strategy {strategy!r}")


STRATEGIES = ("naive", "factored", "auto", "rank", "partition", "rank+partition")


@dataclass
class MemoryPlan:
    """Bytes per layer and strategy; ``total[strategy]`` sums the layers."""

    num_data: int
    rank: int
    block_size: int
    dtype: torch.dtype
    layers: dict[str, dict[str, int]]

    @property
    def total(self) -> dict[str, int]:
        return {s: sum(row[s] for row in self.layers.values()) for s in STRATEGIES}

    def headers(self) -> list[str]:
        r, k = self.rank, self.block_size
        return ["naive", "factored", "auto (exact)", f"rank-{r}", f"partition-{k}", f"rank-{r}+partition-{k}"]

    def format(self, unit: float = 1e9, unit_name: str = "GB", per_layer: bool = True) -> str:
        names = list(self.layers) if per_layer else []
        width = max([len(n) for n in names] + [5])
        head = f"{'layer':<{width}}" + "".join(f"{h:>22}" for h in self.headers())
        lines = [f"gradient table for N = {self.num_data:,} examples, {self.dtype}, in {unit_name}", head]
        for name in names:
            lines.append(f"{name:<{width}}" + "".join(f"{self.layers[name][s] / unit:>22.4f}" for s in STRATEGIES))
        lines.append(f"{'total':<{width}}" + "".join(f"{self.total[s] / unit:>22.4f}" for s in STRATEGIES))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def layouts_of(model: nn.Module, example_input: torch.Tensor | tuple) -> dict[str, RowLayout]:
    """Row layouts of every trainable parameter, from one forward/backward of ``example_input``.

    The model runs in eval mode (BatchNorm on running statistics) and is restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with PerExampleGradients(model, "sum", check=False) as engine:
            inputs = example_input if isinstance(example_input, tuple) else (example_input,)
            out = model(*inputs)
            sum(o.float().sum() for o in flat_tensors(out) if o.is_floating_point()).backward()
            reps = engine.collect()
    finally:
        for m, mode in modes.items():
            m.training = mode
        model.zero_grad(set_to_none=True)
    return {name: RowLayout.of(rep) for name, rep in reps.items()}


def plan(
    model: nn.Module,
    example_input: torch.Tensor | tuple,
    num_data: int,
    rank: int = 1,
    block_size: int = 128,
    dtype: torch.dtype | None = None,
) -> MemoryPlan:
    """Bytes of each strategy per layer and in total for a table of ``num_data`` examples.

    ``example_input`` is one batch (one example suffices) used to learn each layer's row layout;
    no table is allocated. ``dtype`` is the storage dtype (default: the parameters').
    """
    if num_data < 1 or rank < 1 or block_size < 1:
        raise ValueError("num_data, rank and block_size must be positive")
    layouts = layouts_of(model, example_input)
    params = dict(model.named_parameters())
    by_layer: dict[str, dict[str, int]] = {}
    for name, layout in layouts.items():
        layer = name.rpartition(".")[0] or name
        store_dtype = dtype or params[name].dtype
        row = by_layer.setdefault(layer, dict.fromkeys(STRATEGIES, 0))
        for s in STRATEGIES:
            row[s] += strategy_bytes(layout, s, num_data, store_dtype, rank, block_size)
    some = next(iter(params.values()))
    return MemoryPlan(num_data, rank, block_size, dtype or some.dtype, by_layer)


def available_bytes(device: torch.device) -> int:
    """Free memory of a device: CUDA's free memory, or the RAM the OS reports available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return math.inf  # unknown: do not refuse
