"""BatchNorm and per-example gradients: replace it with GroupNorm, or freeze its statistics.

BatchNorm in training mode normalizes each example with the statistics of the whole batch, so an
example's loss depends on the other examples and per-example gradients are undefined (the engine
refuses it). Two ways out, as Opacus offers (``ModuleValidator.fix``):

- `replace_batchnorm`: every BatchNorm becomes a GroupNorm of the same channels, affine weight and bias
  kept. GroupNorm normalizes each example over groups of its own channels, so it is a per-example
  function, and the sampled model is a different (but batch-independent) network.
- `freeze_batchnorm`: BatchNorm in eval mode with fixed running statistics, which makes it the per-example
  affine map y = (x − μ)/√(σ² + ε)·w + b. The statistics are part of the model's definition, not sampled:
  estimate them once before sampling (a pretrained network's, or ``inputs=`` here: a pass over the data at
  the current parameters, as ``torch.optim.swa_utils.update_bn``) and keep them fixed, since changing them
  during a run would change the target distribution. The frozen layers stay in eval mode through
  ``model.train()``; the weight and bias are still sampled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "default_num_groups",
    "freeze_batchnorm",
    "replace_batchnorm",
]

_BN = nn.modules.batchnorm._BatchNorm


def default_num_groups(num_channels: int, batchnorm: nn.Module | None = None) -> int:
    """The groups `replace_batchnorm` uses when not told: one group for ``BatchNorm1d`` (features of an MLP,
    [B, C]: a group of a few features normalized alone would be nearly constant, and one group is LayerNorm
    over the features), otherwise the largest divisor of ``num_channels`` that is at most 32 (Wu & He's
    GroupNorm default; Opacus uses ``min(32, C)``) and leaves at least two channels per group: one channel per
    group is InstanceNorm, which drops each channel's mean, and so the bias of the layer before, altogether
    (C = 64 → 32 groups, 16 → 8, 6 → 3, a prime C → 1)."""
    if isinstance(batchnorm, nn.BatchNorm1d):
        return 1
    return max(g for g in range(1, min(32, num_channels // 2) + 1) if num_channels % g == 0) if num_channels > 1 else 1


def _named_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BN)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _group_norm(bn: nn.Module, groups: int) -> nn.GroupNorm:
    ref = bn.weight if bn.affine else bn.running_mean
    kwargs = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    gn = nn.GroupNorm(groups, bn.num_features, eps=bn.eps, affine=bn.affine, **kwargs)
    if bn.affine:
        # the same Parameter objects: their values, requires_grad and any tying are kept
        gn.weight, gn.bias = bn.weight, bn.bias
    gn.train(bn.training)
    return gn


def replace_batchnorm(model: nn.Module, num_groups: int | None = None) -> nn.Module:
    """Replaces every BatchNorm1d/2d/3d (and SyncBatchNorm) in ``model`` with ``nn.GroupNorm(num_groups, C)`` of
    the same channels C, ``eps`` and ``affine``, keeping the affine weight and bias (the same Parameter objects).

    ``num_groups=None`` chooses per layer (`default_num_groups`: 1 for BatchNorm1d, else the largest divisor
    of C up to 32 leaving two channels or more a group). A ``num_groups`` that does not divide some layer's
    channels raises ``ValueError`` naming the layer before anything is changed. Changes ``model`` in place
    and returns it (a BatchNorm given as the model itself is returned replaced). The running statistics are
    dropped: a state dict saved before has extra ``running_mean``/``running_var``/``num_batches_tracked``
    keys (``load_state_dict(..., strict=False)``). GroupNorm takes [B, C, *] inputs, as BatchNorm does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_batchnorm needs an nn.Module, got {type(model).__name__}")
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1):
        raise ValueError(f"num_groups must be a positive integer or None (chosen per layer), got {num_groups!r}")
    plan = []
    for name, bn in _named_batchnorms(model):
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(f"layer '{name or 'the model'}' ({type(bn).__name__}) does not know its channels yet: "
                             "run one forward pass first, then replace_batchnorm")
        channels = bn.num_features
        groups = default_num_groups(channels, bn) if num_groups is None else num_groups
        if channels % groups:
            divisors = [g for g in range(1, channels + 1) if channels % g == 0]
            raise ValueError(
                f"num_groups={groups} does not divide the {channels} channels of layer '{name or 'the model'}' "
                f"({type(bn).__name__}): GroupNorm splits the channels into equal groups. Pass a divisor of "
                f"{channels} (one of {divisors}), or num_groups=None to choose per layer"
            )
        plan.append((name, _group_norm(bn, groups)))
    for name, gn in plan:
        if not name:
            return gn
        _set_module(model, name, gn)
    return model


class _FrozenStatistics:
    """A BatchNorm that stays in eval mode: ``train()`` leaves it on its running statistics."""

    def train(self, mode: bool = True) -> nn.Module:
        return super().train(False)


class FrozenBatchNorm1d(_FrozenStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on fixed running statistics (see `freeze_batchnorm`)."""


class FrozenBatchNorm2d(_FrozenStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on fixed running statistics (see `freeze_batchnorm`)."""


class FrozenBatchNorm3d(_FrozenStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` on fixed running statistics (see `freeze_batchnorm`)."""


_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm3d: FrozenBatchNorm3d}


@torch.no_grad()
def _estimate_statistics(model: nn.Module, bns: list[nn.Module], inputs: Iterable) -> None:
    """One pass over ``inputs`` in training mode with a cumulative average (``momentum=None``), as
    ``torch.optim.swa_utils.update_bn`` does; the model's modes and the momenta are restored after."""
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.training = True  # directly: a frozen layer's train() keeps it in eval mode
        seen = 0
        for x in inputs:
            model(*x) if isinstance(x, tuple) else model(x)
            seen += 1
        if not seen:
            raise ValueError("freeze_batchnorm: inputs= gave no batch to estimate the statistics from")
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode


def freeze_batchnorm(model: nn.Module, inputs: Iterable | None = None) -> nn.Module:
    """Puts every BatchNorm1d/2d/3d of ``model`` on fixed running statistics, for good: each becomes a
    `FrozenBatchNorm1d`/`2d`/`3d` (the same module, parameters, buffers and state-dict keys) that stays in
    eval mode through ``model.train()``, so the per-example engine accepts it (y_i = (x_i − μ)/√(σ² + ε)·w + b
    is a function of example i alone) and its weight and bias are still sampled.

    ``inputs``: an iterable of model inputs (tensors, or tuples of positional arguments) from which to
    estimate the statistics first, by one pass in training mode at the current parameters with a cumulative
    average (the warm-up; e.g. ``(x for _, x, _ in loader)``); without it the statistics the layers hold now
    are kept (a pretrained network's, or those of a training run). Changes ``model`` in place and returns it.
    Raises ``ValueError`` for a BatchNorm without running statistics (``track_running_stats=False``), which can
    only normalize with the batch's: rebuild it with running statistics, or use `replace_batchnorm`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_batchnorm needs an nn.Module, got {type(model).__name__}")
    bns = _named_batchnorms(model)
    for name, bn in bns:
        where = f"layer '{name or 'the model'}' ({type(bn).__name__})"
        if type(bn) not in _FROZEN and not isinstance(bn, _FrozenStatistics):
            raise TypeError(f"freeze_batchnorm handles BatchNorm1d/2d/3d; {where} is another kind: "
                            "use vr_mcmc.per_example.replace_batchnorm, or put it in eval mode yourself")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{where} has no running statistics (track_running_stats=False), so it can only normalize with "
                "the batch's, which mixes examples: build it with track_running_stats=True (and estimate them with "
                "inputs=), or use vr_mcmc.per_example.replace_batchnorm(model)"
            )
    modules = [bn for _, bn in bns]
    if inputs is not None:
        _estimate_statistics(model, modules, inputs)
    for bn in modules:
        if not isinstance(bn, _FrozenStatistics):
            bn.__class__ = _FROZEN[type(bn)]
        bn.train(False)
    return model
