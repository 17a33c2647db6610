"""Normalization layers: y = x̂ ⊙ w + b, so g_i(w) = Σ dZ_i ⊙ x̂_i and g_i(b) = Σ dZ_i.

The sums run over the positions that share an affine parameter (all dims except the batch and
the parameter's own). x̂ is recomputed from the saved input exactly as the layer computes it.
Normalizations over each example alone (LayerNorm, GroupNorm, RMSNorm, InstanceNorm) and
BatchNorm with running statistics (eval mode) are per-example functions; BatchNorm on batch
statistics mixes examples and is refused by the engine when it runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_rule
from ..representations import Dense, PerExampleGradient


def _affine_grads(module: nn.Module, xhat: torch.Tensor, grad_output: torch.Tensor, param_dims: int,
                  channel_first: bool) -> dict[str, PerExampleGradient]:
    """Per-example gradients of y = x̂·w + b where w has ``param_dims`` dims.

    channel_first: the parameter indexes dim 1 ([B, C, *spatial]); otherwise the trailing dims.
    """
    b = xhat.shape[0]

    def by_position(t: torch.Tensor) -> torch.Tensor:
        """[B, positions, *param shape]: the terms summed into each example's gradient."""
        if channel_first:
            return t.reshape(b, t.shape[1], -1).transpose(1, 2)
        return t.reshape(b, -1, *t.shape[t.dim() - param_dims:])

    out: dict[str, PerExampleGradient] = {}
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is not None and weight.requires_grad:
        out["weight"] = Dense.from_terms(by_position(grad_output * xhat))
    if bias is not None and bias.requires_grad:
        out["bias"] = Dense.from_terms(by_position(grad_output))
    return out


def _group_xhat(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """x̂ of a [B, C, *spatial] input normalized over each of ``groups`` channel groups per example.

    The library's fused kernel without affine parameters: one pass, and the statistics the layer's
    own forward computed (var_mean + subtract + rsqrt took 5x longer on a CPU).
    """
    b, c = x.shape[:2]
    if x.numel() == 0:
        return x.clone()
    return torch.native_group_norm(x.contiguous(), None, None, b, c, x[0, 0].numel(), groups, eps)[0]


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, inputs: tuple, grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    x = inputs[0]
    nd = len(module.normalized_shape)
    xhat = torch.native_layer_norm(x, module.normalized_shape, None, None, module.eps)[0]
    return _affine_grads(module, xhat, grad_output, nd, channel_first=False)


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def rms_norm_rule(module: nn.RMSNorm, inputs: tuple, grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
        x = inputs[0]
        nd = len(module.normalized_shape)
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        dims = tuple(range(x.dim() - nd, x.dim()))
        xhat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        return _affine_grads(module, xhat, grad_output, nd, channel_first=False)


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, inputs: tuple, grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    x = inputs[0]
    xhat = _group_xhat(x.reshape(*x.shape[:2], -1), module.num_groups, module.eps).reshape(x.shape)
    return _affine_grads(module, xhat, grad_output, 1, channel_first=True)


def _uses_running_stats(module: nn.modules.batchnorm._NormBase) -> bool:
    return not module.training and module.track_running_stats and module.running_mean is not None


def _running_xhat(module: nn.modules.batchnorm._NormBase, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, inputs: tuple,
                    grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    # The engine refuses batch statistics at forward time, so running statistics are in use here.
    x = inputs[0]
    return _affine_grads(module, _running_xhat(module, x), grad_output, 1, channel_first=True)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_rule(module: nn.modules.instancenorm._InstanceNorm, inputs: tuple,
                       grad_output: torch.Tensor) -> dict[str, PerExampleGradient]:
    x = inputs[0]
    # One group per channel without running statistics.
    xhat = _running_xhat(module, x) if _uses_running_stats(module) else _group_xhat(x, x.shape[1], module.eps)
    return _affine_grads(module, xhat, grad_output, 1, channel_first=True)
