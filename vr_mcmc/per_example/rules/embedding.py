"""nn.Embedding: example i's gradient adds dZ_it to row idx_it for each of its lookups t."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MixedExamplesError
from ..registry import register_rule
from ..representations import PerExampleGradient, RowSparse


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs: tuple, grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    if module.scale_grad_by_freq:
        raise MixedExamplesError(
            f"{module!r} has scale_grad_by_freq=True, which scales each row's gradient by its count in the "
            "whole batch and so mixes examples; construct it with scale_grad_by_freq=False"
        )
    if not module.weight.requires_grad:
        return {}
    idx = inputs[0]
    b = idx.shape[0]
    idx = idx.reshape(b, -1)
    values = grad_output.reshape(b, idx.shape[1], module.embedding_dim)
    if module.padding_idx is not None:
        # torch gives the padding row no gradient.
        values = values.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)
    return {"weight": RowSparse(idx, values, module.num_embeddings)}
