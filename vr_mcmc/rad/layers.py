"""Randomized Linear/Conv layers: exact forward, randomized weight gradient (the exact lean layers: `lean`).

Each randomized layer is the torch layer it subclasses, with the same parameters, so a state dict
moves freely between the two. Its forward output is the exact layer's; its backward pass returns
exact input and bias gradients and the unbiased weight gradient dZᵀ â from the saved `compress`-ed
activation (see `vr_mcmc.rad.sampling`). Only the compressed activation, the weight (a
parameter, when the input needs a gradient) and an integer seed are kept for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vr_mcmc.per_example.errors import PerExampleError
from vr_mcmc.per_example.registry import register_rule
from vr_mcmc.per_example.rules.conv import conv_rule
from vr_mcmc.per_example.rules.linear import linear_rule

from . import context
from .sampling import MODES, Spec, compress, weight_grad_linear
from .sampling import expand as expand_activation

__all__ = [
    "RandConv1d",
    "RandConv2d",
    "RandConv3d",
    "RandLinear",
    "RandomizedLayer",
]

_MAX_PENDING = 4096  # seeds a layer keeps between backward passes (ints; a bound against forwards never backpropagated)


def check_spec(keep: float, mode: str, replacement: bool) -> Spec:
    """A validated `Spec`, or a ValueError naming the bad argument and the allowed values."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 < keep <= 1:
        raise ValueError(
            f"keep must be a fraction in (0, 1] (the share of each activation saved for the backward pass, "
            f"e.g. 0.1), got {keep!r}"
        )
    if mode not in MODES:
        raise ValueError(
            f"mode must be 'same' (one random sample of positions per batch), 'different' (one per example) or "
            f"'projection' (a random ±1 projection), got {mode!r}"
        )
    if not isinstance(replacement, bool):
        raise TypeError(f"replacement must be True or False, got {replacement!r}")
    if replacement and mode == "projection":
        raise ValueError("replacement=True applies to mode='same' or 'different', not to mode='projection'")
    return Spec(float(keep), mode, replacement)


@dataclass
class _PatternState:
    """The seeds of a layer's randomized calls since its last backward pass (for `repeat_last_pattern`)."""

    seeds: list[int] = field(default_factory=list)
    closed: bool = False  # a backward pass ran: the next randomized call starts a new list
    cursor: int = 0  # next seed to replay in the current repeat block
    cursor_epoch: int = -1
    last_randomized: bool = False  # whether the layer's last forward with gradients was randomized


class RandomizedLayer(nn.Module):
    """What randomized layers share: their spec, the seed draw and the replay of patterns.

    Seeds are drawn from ``generator`` (a CPU `torch.Generator`), or from torch's global
    generator when it is None, so ``torch.manual_seed`` makes a run reproducible.
    """

    rad_spec: Spec
    rad_generator: torch.Generator | None

    def _setup_rad(self, keep: float, mode: str, replacement: bool, generator: torch.Generator | None) -> None:
        self.rad_spec = check_spec(keep, mode, replacement)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.rad_generator = generator
        self._rad_state = _PatternState()

    @property
    def keep(self) -> float:
        return self.rad_spec.keep

    @property
    def mode(self) -> str:
        return self.rad_spec.mode

    def _next_seed(self) -> tuple[int, bool] | None:
        """(seed, whether it is recorded) for a randomized call, or None for the exact path."""
        state = self._rad_state
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return None  # nothing is saved for a weight gradient: the exact layer costs no more
        mode = context.current_mode()
        if mode == context.EXACT:
            state.last_randomized = False
            return None
        state.last_randomized = True
        if mode == context.REPEAT:
            epoch = context.repeat_epoch()
            if state.cursor_epoch != epoch:
                state.cursor_epoch, state.cursor = epoch, 0
            if state.cursor >= len(state.seeds):
                raise RuntimeError(
                    f"repeat_last_pattern(): this {type(self).__name__} is called {state.cursor + 1} times inside the "
                    f"block but its last randomized forward pass (the calls since its last backward) called it "
                    f"{len(state.seeds)} times, so there is no pattern to repeat. Run the same computation at θ "
                    "(forward and backward) just before the repeated one."
                )
            seed = state.seeds[state.cursor]
            state.cursor += 1
            return seed, False
        seed = int(torch.randint(0, 2**62, (), generator=self.rad_generator))
        if state.closed or len(state.seeds) >= _MAX_PENDING:
            state.seeds.clear()
            state.closed = False
        state.seeds.append(seed)
        return seed, True

    def extra_repr(self) -> str:
        spec = self.rad_spec
        extra = ", replacement=True" if spec.replacement else ""
        return f"{super().extra_repr()}, keep={spec.keep:g}, mode={spec.mode!r}{extra}"


class _RadLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: Spec, seed: int, state: _PatternState, record: bool):
        out = F.linear(x, weight, bias)
        d = x.shape[-1]
        saved = compress(x.reshape(-1, 1, d), spec, seed)
        ctx.spec, ctx.seed, ctx.state, ctx.record, ctx.d = spec, seed, state, record, d
        ctx.dtypes = (x.dtype, weight.dtype)
        # Tensors go through save_for_backward (never ctx attributes) so that saved-tensor hooks see them.
        ctx.save_for_backward(saved, weight if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, weight = ctx.saved_tensors
        if ctx.record:
            ctx.state.closed = True
        grad_x = grad_w = grad_b = None
        x_dtype, w_dtype = ctx.dtypes  # they differ from grad's under autocast
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype)).to(x_dtype)
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_linear(g2.to(saved.dtype), saved, ctx.d, ctx.spec, ctx.seed).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(tuple(range(grad.dim() - 1))) if grad.dim() > 1 else grad
        return grad_x, grad_w, grad_b, None, None, None, None


class RandLinear(RandomizedLayer, nn.Linear):
    """nn.Linear whose weight gradient is estimated from a random ``keep`` share of its input.

    Forward: y = x Wᵀ + b, exact. Backward: dL/dx = dZ W and dL/db = Σ dZ exactly; dL/dW = dZᵀ x̂
    with x̂ the `vr_mcmc.rad.sampling` estimate of the input rows (E[x̂] = x), D = in_features,
    k = ⌈keep·D⌉ numbers saved per row instead of D. "different" draws one pattern per row of
    the input flattened to [R, in_features] (per example for [B, in_features] inputs). Inside
    `vr_mcmc.rad.exact()`, or when the weight needs no gradient, it is the plain nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 keep: float = 0.1, mode: str = "different", replacement: bool = False,
                 generator: torch.Generator | None = None):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup_rad(keep, mode, replacement, generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        drawn = self._next_seed()
        if drawn is None:
            return F.linear(input, self.weight, self.bias)
        return _RadLinearFn.apply(input, self.weight, self.bias, self.rad_spec, drawn[0], self._rad_state, drawn[1])


class _RadConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: Spec, seed: int, state: _PatternState, record: bool, stride, padding,
                dilation, groups):
        n = x.dim() - 2
        out = _CONV[n](x, weight, bias, stride, padding, dilation, groups)
        saved = compress(x.reshape(x.shape[0], x.shape[1], -1), spec, seed)
        ctx.spec, ctx.seed, ctx.state, ctx.record = spec, seed, state, record
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.x_shape, ctx.bias_shape = x.shape, None if bias is None else list(bias.shape)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(saved, weight)  # the weight is a parameter: it costs no activation memory
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, weight = ctx.saved_tensors
        if ctx.record:
            ctx.state.closed = True
        stride, padding, dilation, groups = ctx.conv
        x_hat = expand_activation(saved, math.prod(ctx.x_shape[2:]), ctx.spec, ctx.seed).view(ctx.x_shape)
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x_hat.to(grad.dtype), weight.to(grad.dtype), ctx.bias_shape, stride, padding, dilation, False,
            [0] * len(stride), groups, [need[0], need[1], need[2]],
        )
        # Under autocast grad may be in a lower precision than the input and parameters.
        grads = (grad_x, grad_w, grad_b)
        grad_x, grad_w, grad_b = (None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _RandConvNd(RandomizedLayer):
    """Shared forward of RandConv1d/2d/3d."""

    def _explicit_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The input padded as the layer pads it, when it cannot be a symmetric zero padding of the convolution."""
        n = len(self.kernel_size)
        if isinstance(self.padding, str):
            if self.padding == "valid":
                pads = [(0, 0)] * n
            else:  # "same": torch puts the odd extra zero after
                pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in
                        zip(self.kernel_size, self.dilation)]
        else:
            pads = [(p, p) for p in self.padding]
        if self.padding_mode == "zeros" and all(a == b for a, b in pads):
            return x, [a for a, _ in pads]
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, [p for pair in reversed(pads) for p in pair], mode=mode), [0] * n

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        drawn = self._next_seed()
        if drawn is None:
            return self._conv_forward(input, self.weight, self.bias)
        n = len(self.kernel_size)
        unbatched = input.dim() == n + 1
        x = input.unsqueeze(0) if unbatched else input
        x, padding = self._explicit_padding(x)
        out = _RadConvFn.apply(x, self.weight, self.bias, self.rad_spec, drawn[0], self._rad_state, drawn[1],
                               self.stride, padding, self.dilation, self.groups)
        return out.squeeze(0) if unbatched else out


class RandConv1d(_RandConvNd, nn.Conv1d):
    """nn.Conv1d with its weight gradient estimated from a random ``keep`` share of its input's positions.

    As `RandConv2d`, over the D = L positions of the (padded) input.
    """

    def __init__(self, *args, keep: float = 0.1, mode: str = "different", replacement: bool = False,
                 generator: torch.Generator | None = None, **kwargs):
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._setup_rad(keep, mode, replacement, generator)


class RandConv2d(_RandConvNd, nn.Conv2d):
    """nn.Conv2d whose weight gradient is estimated from a random ``keep`` share of its input's positions.

    Forward: exact. Backward: exact input and bias gradients; the weight gradient is the exact
    convolution backward applied to x̂ [B, C, H, W], the `vr_mcmc.rad.sampling` estimate of the
    input over its D = H·W spatial positions (all C channels of a kept position are kept): C·k
    numbers saved per example instead of C·D, k = ⌈keep·D⌉. Non-zero padding modes and
    asymmetric 'same' padding are applied to the input first, and D counts the padded positions.
    """

    def __init__(self, *args, keep: float = 0.1, mode: str = "different", replacement: bool = False,
                 generator: torch.Generator | None = None, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._setup_rad(keep, mode, replacement, generator)


class RandConv3d(_RandConvNd, nn.Conv3d):
    """nn.Conv3d with its weight gradient estimated from a random ``keep`` share of its input's positions.

    As `RandConv2d`, over the D = T·H·W positions of the (padded) input.
    """

    def __init__(self, *args, keep: float = 0.1, mode: str = "different", replacement: bool = False,
                 generator: torch.Generator | None = None, **kwargs):
        nn.Conv3d.__init__(self, *args, **kwargs)
        self._setup_rad(keep, mode, replacement, generator)


# -- the per-example engine ----------------------------------------------------------------------


def _refuse_randomized(module: nn.Module) -> None:
    if module._rad_state.last_randomized:
        raise PerExampleError(
            f"{type(module).__name__} randomizes its weight gradient (vr_mcmc.rad), so per-example gradients would "
            "not add up to its .grad, and the engine would keep the full layer input that randomized autodiff "
            "avoids storing. Run the forward inside `with vr_mcmc.rad.exact():` for exact per-example gradients, "
            "or use the exact model (vr_mcmc.rad.derandomize(model))."
        )


@register_rule(RandLinear)
def _rand_linear_rule(module, inputs, grad_output):
    _refuse_randomized(module)
    return linear_rule(module, inputs, grad_output)


@register_rule(RandConv1d, RandConv2d, RandConv3d)
def _rand_conv_rule(module, inputs, grad_output):
    _refuse_randomized(module)
    return conv_rule(module, inputs, grad_output)
