"""nn.EmbeddingBag: one example per bag.

Bag j of a 2-D input [B, L] is row j; of a flat input with ``offsets`` it is
``input[offsets[j]:offsets[j+1]]``. Example j's gradient adds to the row of each of its lookups t:
``w_t dZ_j`` in mode "sum" (w the per-sample weights, 1 without), ``dZ_j / n_j`` in mode "mean"
(n_j the bag's lookups other than ``padding_idx``), and in mode "max" ``dZ_j[d]`` in each
dimension d of the lookup that holds that dimension's maximum (the first, as torch picks it).
Lookups of ``padding_idx`` get nothing. The bags are padded to the longest with zero values, a
`RowSparse` [B, longest bag, D].
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MixedExamplesError, PerExampleError
from ..registry import register_rule
from ..representations import PerExampleGradient, RowSparse


def _args(inputs: tuple) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    padded = (*inputs, None, None)
    return padded[0], padded[1], padded[2]


def embedding_bag_batch_size(module: nn.EmbeddingBag, inputs: tuple) -> int:
    """Number of bags in a call: rows of a 2-D input, or entries of ``offsets`` for a flat one."""
    x, offsets, _ = _args(inputs)
    if x.dim() == 2 or offsets is None:
        return x.shape[0]
    return offsets.numel() - (1 if module.include_last_offset else 0)


def _bags(module: nn.EmbeddingBag, x: torch.Tensor, offsets: torch.Tensor | None,
          weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Indices [B, T], a mask of real lookups [B, T] and per-sample weights [B, T] (or None), bags padded to T."""
    if x.dim() == 2:
        return x, torch.ones_like(x, dtype=torch.bool), weights
    if x.dim() != 1 or offsets is None:
        raise PerExampleError(
            f"{module!r} received an input of shape {tuple(x.shape)}; per-example gradients need a 2-D input "
            "[bags, lookups] or a 1-D input with offsets"
        )
    n = x.shape[0]
    starts = offsets[:-1] if module.include_last_offset else offsets
    ends = offsets[1:] if module.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([n])])
    lengths = (ends - starts).clamp_min(0)
    b = starts.numel()
    longest = int(lengths.max()) if b else 0
    position = torch.arange(longest, device=x.device)
    mask = position < lengths.unsqueeze(1)
    flat = (starts.unsqueeze(1) + position).masked_fill(~mask, 0)
    if n == 0:
        return x.new_zeros(b, longest), mask, None if weights is None else weights.new_zeros(b, longest)
    idx = x[flat.clamp_max(n - 1)].masked_fill(~mask, 0)
    return idx, mask, None if weights is None else weights[flat.clamp_max(n - 1)].masked_fill(~mask, 0)


@register_rule(nn.EmbeddingBag, batch_size=embedding_bag_batch_size)
def embedding_bag_rule(module: nn.EmbeddingBag, inputs: tuple,
                       grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    if module.scale_grad_by_freq:
        raise MixedExamplesError(
            f"{module!r} has scale_grad_by_freq=True, which scales each row's gradient by its count in the "
            "whole batch and so mixes examples; construct it with scale_grad_by_freq=False"
        )
    if not module.weight.requires_grad:
        return {}
    x, offsets, weights = _args(inputs)
    idx, mask, weights = _bags(module, x, offsets, weights)
    if module.padding_idx is not None:
        mask = mask & (idx != module.padding_idx)
    dz = grad_output.unsqueeze(1)  # [B, 1, D]
    scale = mask.to(dz.dtype)
    if module.mode == "sum":
        values = dz * (scale if weights is None else weights.to(dz.dtype) * scale).unsqueeze(-1)
    elif module.mode == "mean":
        values = dz * (scale / scale.sum(1, keepdim=True).clamp_min(1)).unsqueeze(-1)
    else:  # max: each dimension's gradient goes to its first maximal lookup
        rows = module.weight.detach()[idx].to(dz.dtype).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        winner = rows.argmax(1, keepdim=True)  # [B, 1, D]
        hit = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, winner, True) & mask.unsqueeze(-1)
        values = dz * hit
    return {"weight": RowSparse(idx, values, module.num_embeddings)}
