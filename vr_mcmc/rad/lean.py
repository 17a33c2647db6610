"""Memory-lean exact layers: ReLU and pooling whose forward and gradient are torch's, saving less for backward.

`vr_mcmc.rad.randomize` swaps them in next to the randomized layers: once activations are
sampled, a float copy of every ReLU output (or of a pooling layer's input) would otherwise
dominate what autograd keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import pack_bits, unpack_bits

__all__ = [
    "LeanAvgPool1d",
    "LeanAvgPool2d",
    "LeanAvgPool3d",
    "LeanMaxPool1d",
    "LeanMaxPool2d",
    "LeanMaxPool3d",
    "LeanReLU",
]


class _LeanReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(x > 0))  # ReLU's Jacobian, one bit per entry
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return grad.masked_fill(~unpack_bits(bits, ctx.shape), 0)


class LeanReLU(nn.ReLU):
    """nn.ReLU that saves its Jacobian as one bit per entry (1/32 of the float output torch saves).

    Forward and gradient are those of ReLU (dL/dx = dL/dy where x > 0, else 0). It never works
    in place (``inplace`` is ignored): its input is not modified.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and input.requires_grad):
            return torch.relu(input)
        return _LeanReLUFn.apply(input)


def _window_offsets(idx: torch.Tensor, in_shape: tuple, kernel: tuple, stride: tuple, padding: tuple,
                    dilation: tuple) -> torch.Tensor:
    """Max-pool indices (flat in each input plane) as the position within their window, in [0, Πk)."""
    n = len(kernel)
    out_shape = idx.shape[-n:]
    offset = torch.zeros_like(idx)
    rem = idx
    coords = []
    for d in reversed(range(n)):
        coords.append(rem % in_shape[d])
        rem = rem // in_shape[d]
    coords.reverse()
    for d in range(n):
        o = torch.arange(out_shape[d], device=idx.device).view([-1] + [1] * (n - 1 - d))
        start = o * stride[d] - padding[d]
        offset = offset * kernel[d] + (coords[d] - start) // dilation[d]
    return offset


def _window_to_flat(offset: torch.Tensor, in_shape: tuple, kernel: tuple, stride: tuple, padding: tuple,
                    dilation: tuple) -> torch.Tensor:
    """The inverse of `_window_offsets`: flat indices into each input plane."""
    n = len(kernel)
    out_shape = offset.shape[-n:]
    rem = offset.long()
    within = []
    for d in reversed(range(n)):
        within.append(rem % kernel[d])
        rem = rem // kernel[d]
    within.reverse()
    flat = torch.zeros_like(within[0])
    for d in range(n):
        o = torch.arange(out_shape[d], device=offset.device).view([-1] + [1] * (n - 1 - d))
        flat = flat * in_shape[d] + o * stride[d] - padding[d] + within[d] * dilation[d]
    return flat


def _offset_dtype(window: int) -> torch.dtype:
    return torch.uint8 if window <= 256 else torch.int16 if window <= 2**15 else torch.int32


def _as_tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _LeanMaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        n = len(kernel)
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        out, idx = pool(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        geometry = (tuple(x.shape[-n:]), kernel, stride, padding, dilation)
        offsets = _window_offsets(idx, *geometry).to(_offset_dtype(math.prod(kernel)))
        ctx.geometry, ctx.x_shape = geometry, x.shape
        ctx.save_for_backward(offsets)
        return out

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        n = len(ctx.geometry[1])
        flat = _window_to_flat(offsets, *ctx.geometry)
        planes = ctx.x_shape[:-n]
        grad_x = grad.new_zeros(*planes, math.prod(ctx.x_shape[-n:]))
        grad_x.scatter_add_(-1, flat.reshape(*planes, -1), grad.reshape(*planes, -1))
        return grad_x.view(ctx.x_shape), None, None, None, None, None


class _LeanMaxPoolNd:
    """Shared forward of LeanMaxPool1d/2d/3d."""

    _n: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.return_indices or not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        n = self._n
        kernel = _as_tuple(self.kernel_size, n)
        stride = _as_tuple(self.stride if self.stride else self.kernel_size, n)
        return _LeanMaxPoolFn.apply(input, kernel, stride, _as_tuple(self.padding, n), _as_tuple(self.dilation, n),
                                    self.ceil_mode)


class LeanMaxPool1d(_LeanMaxPoolNd, nn.MaxPool1d):
    """nn.MaxPool1d saving each output's position within its window (1 byte for windows ≤ 256)
    instead of torch's float input and int64 indices. Same output and gradient."""

    _n = 1


class LeanMaxPool2d(_LeanMaxPoolNd, nn.MaxPool2d):
    """nn.MaxPool2d saving each output's position within its window (1 byte for windows ≤ 256)
    instead of torch's float input and int64 indices. Same output and gradient."""

    _n = 2


class LeanMaxPool3d(_LeanMaxPoolNd, nn.MaxPool3d):
    """nn.MaxPool3d saving each output's position within its window (1 byte for windows ≤ 256)
    instead of torch's float input and int64 indices. Same output and gradient."""

    _n = 3


class _LeanAvgPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, args):
        ctx.x_shape, ctx.args = x.shape, args
        return F.avg_pool3d(x, *args) if len(args[0]) == 3 else F.avg_pool2d(x, *args)

    @staticmethod
    def backward(ctx, grad):
        # The pooling backward reads only the shape of the input it is given.
        shape_only = grad.new_empty(ctx.x_shape)
        if len(ctx.args[0]) == 3:
            grad_x = torch.ops.aten.avg_pool3d_backward(grad, shape_only, *ctx.args)
        else:
            grad_x = torch.ops.aten.avg_pool2d_backward(grad, shape_only, *ctx.args)
        return grad_x, None


class _LeanAvgPoolNd:
    """Shared forward of LeanAvgPool1d/2d/3d: saves nothing (average pooling's gradient needs only shapes)."""

    _n: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        n = self._n
        kernel = _as_tuple(self.kernel_size, n)
        stride = _as_tuple(self.stride if self.stride else self.kernel_size, n)
        padding = _as_tuple(self.padding, n)
        divisor = getattr(self, "divisor_override", None)
        if n == 1:  # 1-d pooling is 2-d pooling over a height of 1
            args = ((1, *kernel), (1, *stride), (0, *padding), self.ceil_mode, self.count_include_pad, None)
            return _LeanAvgPoolFn.apply(input.unsqueeze(-2), args).squeeze(-2)
        args = (kernel, stride, padding, self.ceil_mode, self.count_include_pad, divisor)
        return _LeanAvgPoolFn.apply(input, args)


class LeanAvgPool1d(_LeanAvgPoolNd, nn.AvgPool1d):
    """nn.AvgPool1d that saves nothing for backward (torch saves its input). Same output and gradient."""

    _n = 1


class LeanAvgPool2d(_LeanAvgPoolNd, nn.AvgPool2d):
    """nn.AvgPool2d that saves nothing for backward (torch saves its input). Same output and gradient."""

    _n = 2


class LeanAvgPool3d(_LeanAvgPoolNd, nn.AvgPool3d):
    """nn.AvgPool3d that saves nothing for backward (torch saves its input). Same output and gradient."""

    _n = 3
