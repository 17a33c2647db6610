"""The random operators of randomized autodiff: sample or project an activation, and undo it unbiasedly.

An activation is laid out as ``a [R, C, D]``: R rows (examples, or the rows of a flattened
Linear input), C channels that are always kept together, D positions that are sampled (Linear:
C = 1 and D = in_features; convolution: C = channels and D = spatial positions). `compress`
returns what is saved, ``[R, C, k]``, and `expand` the estimate â [R, C, D] with E[â] = a. The
pattern is a function of an integer seed alone: `compress` and `expand` regenerate it from the
seed, so it is never stored.

With k = `num_kept`(keep, D) and ‖a‖² summed over a row's channels and positions:

- ``"same"`` / ``"different"``, without replacement (default): k distinct positions, uniform,
  scaled D/k. E‖â − a‖² = (D − k)/k · ‖a‖² per row; keep = 1 is exact.
- ``"same"`` / ``"different"``, ``replacement=True``: k positions drawn uniformly with
  replacement, each scaled D/k (a repeated position counts each time). E‖â − a‖² = (D − 1)/k · ‖a‖².
- ``"projection"``: â = a P Pᵀ with P [D, k] of independent ±1/√k (Rademacher), E[PPᵀ] = I.
  E‖â − a‖² = (D − 1)/k · ‖a‖² per row and channel, as for sampling with replacement.

"same" draws one pattern (one P) for all rows; "different" one per row. Projection uses one P
for the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MODES", "Spec", "compress", "expand", "num_kept", "pack_bits", "unpack_bits", "variance_factor"]

MODES = ("same", "different", "projection")


def num_kept(keep: float, d: int) -> int:
    """k = ⌈keep·D⌉ (at least 1): the positions (or projection columns) kept of D."""
    # round() first: 0.1·1000 is 100.00000000000001 in floating point, which must not become 101.
    return max(1, math.ceil(round(keep * d, 9)))


def variance_factor(d: int, k: int, mode: str, replacement: bool = False) -> float:
    """c with E‖â − a‖² = c·‖a‖² for one row (see the module docstring)."""
    if mode == "projection" or replacement:
        return (d - 1) / k
    return (d - k) / k


@dataclass(frozen=True)
class Spec:
    """How one layer randomizes: ``mode`` in `MODES`, ``keep`` in (0, 1], sampling with ``replacement``."""

    keep: float
    mode: str
    replacement: bool = False


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _indices(seed: int, device: torch.device, rows: int, d: int, k: int, spec: Spec) -> torch.Tensor:
    """Kept positions: [k] for "same", [rows, k] for "different"."""
    g = _generator(seed, device)
    if spec.mode == "same":
        if spec.replacement:
            return torch.randint(d, (k,), generator=g, device=device)
        return torch.randperm(d, generator=g, device=device)[:k]
    if spec.replacement:
        return torch.randint(d, (rows, k), generator=g, device=device)
    # k distinct positions per row: the k largest of D uniform keys (a uniform k-subset).
    return torch.rand(rows, d, generator=g, device=device).topk(k, dim=1, sorted=False).indices


def _projection(seed: int, device: torch.device, dtype: torch.dtype, d: int, k: int) -> torch.Tensor:
    """P [D, k] of independent ±1/√k."""
    g = _generator(seed, device)
    signs = torch.randint(0, 2, (d, k), generator=g, device=device, dtype=dtype)
    return (signs * 2 - 1) * (1.0 / math.sqrt(k))


def compress(a: torch.Tensor, spec: Spec, seed: int) -> torch.Tensor:
    """What is saved of ``a [R, C, D]``: the kept positions' values (unscaled) or a P, ``[R, C, k]``."""
    rows, channels, d = a.shape
    k = num_kept(spec.keep, d)
    if spec.mode == "projection":
        return a @ _projection(seed, a.device, a.dtype, d, k)
    idx = _indices(seed, a.device, rows, d, k, spec)
    if spec.mode == "same":
        return a.index_select(2, idx)
    return a.gather(2, idx.unsqueeze(1).expand(rows, channels, k))


def expand(saved: torch.Tensor, d: int, spec: Spec, seed: int) -> torch.Tensor:
    """The unbiased estimate â [R, C, D] of the activation that `compress` saved as ``saved [R, C, k]``."""
    rows, channels, k = saved.shape
    if spec.mode == "projection":
        return saved @ _projection(seed, saved.device, saved.dtype, d, k).t()
    idx = _indices(seed, saved.device, rows, d, k, spec)
    out = saved.new_zeros(rows, channels, d)
    scaled = saved * (d / k)
    if spec.mode == "same":
        return out.index_add_(2, idx, scaled)  # adds up repeated positions (with replacement)
    return out.scatter_add_(2, idx.unsqueeze(1).expand(rows, channels, k), scaled)


def weight_grad_linear(grad_out: torch.Tensor, saved: torch.Tensor, d: int, spec: Spec, seed: int) -> torch.Tensor:
    """dZᵀ â for a Linear layer: ``grad_out [R, out]``, ``saved [R, 1, k]`` → [out, D].

    "same" and "projection" contract over the rows first (out·k numbers) and scatter or project
    once; "different" has to expand the estimate, [R, D], for the backward pass only.
    """
    rows, _, k = saved.shape
    s = saved.reshape(rows, k)
    if spec.mode == "projection":
        return (grad_out.t() @ s) @ _projection(seed, saved.device, saved.dtype, d, k).t()
    if spec.mode == "same":
        idx = _indices(seed, saved.device, rows, d, k, spec)
        small = (grad_out.t() @ s) * (d / k)
        return small.new_zeros(small.shape[0], d).index_add_(1, idx, small)
    return grad_out.t() @ expand(saved, d, spec, seed).reshape(rows, d)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as 1 bit per entry: uint8 [⌈n/8⌉], little-endian within a byte."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The bool tensor of ``shape`` that `pack_bits` packed."""
    n = math.prod(shape)
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:n].view(shape).bool()
