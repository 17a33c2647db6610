"""nn.Linear: g_i(W) = Σ_t dZ_itᵀ A_it over the extra input dimensions t, g_i(b) = Σ_t dZ_it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PerExampleError
from ..registry import register_rule
from ..representations import Dense, Factored, PerExampleGradient


def factored_or_dense(
    inputs: torch.Tensor, grad_outputs: torch.Tensor, shape: Sequence[int]
) -> PerExampleGradient:
    """The smaller exact representation of ``g_i = Σ_t dZ_itᵀ A_it``: the factors, or the product.

    Factors hold T·(d_in + d_out) numbers per example and the product d_in·d_out, so factors
    win for plain Linear layers (T = 1) and late convolutions, the product for early ones.
    """
    t = inputs.shape[-2]
    groups = inputs.shape[1] if inputs.dim() == 4 else 1
    factored = Factored(inputs, grad_outputs, shape)
    if groups * t * (inputs.shape[-1] + grad_outputs.shape[-1]) <= math.prod(shape):
        return factored
    return Dense(factored.dense())


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, inputs: tuple, grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    x = inputs[0]
    if x.dim() < 2:
        raise PerExampleError(
            f"Linear received an input of shape {tuple(x.shape)} without a batch dimension; "
            "per-example gradients need inputs [B, ..., in_features]"
        )
    b = x.shape[0]
    a = x.reshape(b, -1, module.in_features)
    dz = grad_output.reshape(b, -1, module.out_features)
    out: dict[str, PerExampleGradient] = {}
    if module.weight.requires_grad:
        out["weight"] = factored_or_dense(a, dz, module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = Dense.from_terms(dz)
    return out
