"""Swap a model's layers for their randomized / memory-lean versions, and measure what autograd saves."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import (
    RandConv1d,
    RandConv2d,
    RandConv3d,
    RandLinear,
    RandomizedLayer,
    check_spec,
)
from .lean import (
    LeanAvgPool1d,
    LeanAvgPool2d,
    LeanAvgPool3d,
    LeanMaxPool1d,
    LeanMaxPool2d,
    LeanMaxPool3d,
    LeanReLU,
)

__all__ = ["derandomize", "randomize", "saved_activation_bytes", "saved_tensors"]

_RANDOMIZED = {nn.Linear: RandLinear, nn.Conv1d: RandConv1d, nn.Conv2d: RandConv2d, nn.Conv3d: RandConv3d}
_LEAN = {
    nn.ReLU: LeanReLU,
    nn.MaxPool1d: LeanMaxPool1d,
    nn.MaxPool2d: LeanMaxPool2d,
    nn.MaxPool3d: LeanMaxPool3d,
    nn.AvgPool1d: LeanAvgPool1d,
    nn.AvgPool2d: LeanAvgPool2d,
    nn.AvgPool3d: LeanAvgPool3d,
}
_EXACT = {v: k for k, v in (*_RANDOMIZED.items(), *_LEAN.items())}


def randomize(
    model: nn.Module,
    keep: float = 0.1,
    mode: str = "different",
    *,
    replacement: bool = False,
    lean: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Make ``model``'s Linear and Conv1d/2d/3d layers randomized (in place) and return ``model``.

    Each ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (exactly those types, not
    subclasses, and not parametrized ones) becomes `RandLinear`/`RandConv1d`/... : the same module
    object with the same parameters, buffers and hooks, so optimizers built on
    ``model.parameters()`` keep working and a state dict of the exact model loads. ``keep`` in
    (0, 1] is the share of each activation saved; ``mode`` is "same" (one random set of positions
    per batch), "different" (one per example) or "projection" (a random ±1 projection to
    k = ⌈keep·D⌉ columns); ``replacement`` samples positions with replacement (see
    `vr_mcmc.rad.sampling` for the variances). Calling it again on a randomized model changes
    the settings.

    ``lean=True`` (default) also swaps modules whose saved tensors would dominate once the
    activations are sampled, for exact versions that save less: ``nn.ReLU`` → `LeanReLU` (its
    Jacobian as 1 bit per entry instead of a float copy of its output), ``nn.MaxPool*d`` →
    `LeanMaxPool2d` etc. (the position within each window, 1 byte, instead of the input and
    int64 indices; not those with ``return_indices=True``), ``nn.AvgPool*d`` → `LeanAvgPool2d`
    etc. (nothing instead of the input). Functional calls (``F.relu``, ``torch.relu``,
    ``F.max_pool2d``) inside a module's forward are not modules and are not replaced: they keep
    saving what torch saves.

    Build `vr_mcmc.per_example.PerExampleGradients` after randomizing, not before; it refuses
    randomized forwards (run them inside `vr_mcmc.rad.exact()` for exact per-example gradients).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"randomize needs an nn.Module, got {type(model).__name__}")
    check_spec(keep, mode, replacement)
    found, skipped = 0, []
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, RandomizedLayer):
            module._setup_rad(keep, mode, replacement, generator)
            found += 1
        elif parametrize.is_parametrized(module):
            # torch makes a parametrized layer an instance of a generated subclass of its class.
            if isinstance(module, tuple(_RANDOMIZED)):
                skipped.append(name or "(the model)")
        elif cls in _RANDOMIZED:
            module.__class__ = _RANDOMIZED[cls]
            module._setup_rad(keep, mode, replacement, generator)
            found += 1
        elif lean and cls in _LEAN and not getattr(module, "return_indices", False):
            module.__class__ = _LEAN[cls]
    if skipped:
        warnings.warn(
            f"randomize left the parametrized layers {skipped} exact (their weight is computed by a parametrization, "
            "which the randomized layers do not support)",
            stacklevel=2,
        )
    if not found:
        raise ValueError(
            f"randomize found no supported layer in {type(model).__name__}: it randomizes nn.Linear, nn.Conv1d, "
            "nn.Conv2d and nn.Conv3d modules (not functional calls such as F.linear, nor subclasses or parametrized "
            "layers). Build the model from those modules, or use vr_mcmc.rad.RandLinear/RandConv2d directly."
        )
    return model


def derandomize(model: nn.Module) -> nn.Module:
    """Undo `randomize` in place (randomized and lean layers back to the torch layers) and return ``model``."""
    for module in model.modules():
        exact = _EXACT.get(type(module))
        if exact is not None:
            module.__class__ = exact
            module.__dict__.pop("_rad_state", None)
            module.__dict__.pop("rad_spec", None)
            module.__dict__.pop("rad_generator", None)
    return model


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[tuple, int]:
    try:
        storage = t.untyped_storage()
        return (t.device, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. sparse): count their data
        return (t.device, id(t)), t.numel() * t.element_size()


def saved_tensors(model: nn.Module, *inputs, include_parameters: bool = False, **kwargs) -> list[dict]:
    """What autograd saves for backward during one forward ``model(*inputs, **kwargs)``, one entry per storage.

    Each entry: ``shape``, ``dtype``, ``bytes`` (of the whole storage: a saved view keeps all of
    it alive) and ``count`` (how many saved tensors share that storage, e.g. a ReLU output that
    the next layer also saves). Storages of the model's parameters and buffers are left out
    unless ``include_parameters`` (they exist whether or not a forward runs).
    """
    own = set()
    if not include_parameters:
        for t in (*model.parameters(), *model.buffers()):
            own.add(_storage_key_and_bytes(t)[0])
    found: dict[tuple, dict] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key_and_bytes(t)
        if key not in own:
            entry = found.setdefault(key, {"shape": tuple(t.shape), "dtype": t.dtype, "bytes": nbytes, "count": 0})
            entry["count"] += 1
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(*inputs, **kwargs)
    del out  # the graph (and what it saved) goes with it
    return list(found.values())


def saved_activation_bytes(model: nn.Module, *inputs, include_parameters: bool = False, **kwargs) -> int:
    """Bytes autograd keeps for backward after one forward ``model(*inputs, **kwargs)``.

    Measured with ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor is seen, and
    each storage is counted once (a tensor saved by two layers, or two views of one tensor,
    count once), whole. The model's own parameters and buffers are not counted unless
    ``include_parameters``. The inputs are counted when a layer saves them (an exact first Linear
    saves its input for the weight gradient). It is an ordinary forward with gradients:
    randomized layers draw (and record) a fresh pattern.
    """
    return sum(e["bytes"] for e in saved_tensors(model, *inputs, include_parameters=include_parameters, **kwargs))
