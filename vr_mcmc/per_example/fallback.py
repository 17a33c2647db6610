"""Per-example gradients of any module through torch.func, from its saved call.

For a module without a rule, each example's gradient is the vjp of the module alone, applied to
that example's saved input and its captured output gradient, vectorized over the batch with
``vmap``. Nothing upstream is recomputed. Every top-level tensor argument whose first dimension
is the batch size is treated as batched; other arguments are shared by all examples.

The vjp recomputes the module's output one example at a time; it must equal the output of the
batched forward. If not, the module mixes examples (or is random), and per-example gradients
through it are undefined: that raises `MixedExamplesError` rather than returning wrong numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .errors import MixedExamplesError, UnsupportedLayerError
from .representations import Dense, PerExampleGradient

__all__ = ["fallback_rule", "flat_tensors"]


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) tuple/list/dict output, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in flat_tensors(item)]
    return []


def _reproduces(recomputed: torch.Tensor, saved: torch.Tensor) -> bool:
    if recomputed.shape != saved.shape:
        return False
    if not saved.dtype.is_floating_point:
        return bool(torch.equal(recomputed, saved))
    eps = torch.finfo(saved.dtype).eps
    scale = saved.abs().max().clamp_min(1.0) if saved.numel() else 1.0
    return bool(torch.allclose(recomputed, saved, rtol=1e4 * eps, atol=float(1e4 * eps * scale)))


def fallback_rule(
    module: nn.Module,
    name: str,
    args: tuple,
    kwargs: dict,
    outputs: list[torch.Tensor],
    versions: list[int],
    grad_outputs: list[torch.Tensor | None],
    batch_size: int,
) -> dict[str, PerExampleGradient]:
    """Dense per-example gradients of ``module``'s trainable parameters (recursive names)."""
    trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    fixed.update(dict(module.named_buffers()))

    slots: list[tuple[str, Any]] = []
    batched: list[torch.Tensor] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch_size:
            slots.append(("arg", i))
            batched.append(a)
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch_size:
            slots.append(("kwarg", k))
            batched.append(a)

    live = [k for k, g in enumerate(grad_outputs) if g is not None]
    cotangents = [grad_outputs[k] for k in live]

    def call(params: dict[str, torch.Tensor], example: list[torch.Tensor]) -> list[torch.Tensor]:
        a, kw = list(args), dict(kwargs)
        for (kind, key), value in zip(slots, example):
            if kind == "arg":
                a[key] = value.unsqueeze(0)
            else:
                kw[key] = value.unsqueeze(0)
        out = flat_tensors(functional_call(module, {**params, **fixed}, tuple(a), kw))
        return [out[k] for k in live]

    def per_example(example: list[torch.Tensor], cots: list[torch.Tensor]) -> tuple[dict, list]:
        def f(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return tuple(call(params, example))

        out, pullback = vjp(f, trainable)
        (grads,) = pullback(tuple(c.unsqueeze(0) for c in cots))
        return grads, list(out)

    vectorized: Callable = vmap(per_example, randomness="error")
    try:
        with warnings.catch_warnings():
            # vmap runs ops without a batching rule (e.g. CPU flash attention) in a loop; correct, only slower.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, recomputed = vectorized(batched, cotangents)
    except Exception as err:
        random = "random" in str(err).lower()
        raise UnsupportedLayerError(
            f"layer '{name}' ({type(module).__name__}) has no per-example rule and the torch.func fallback "
            f"failed: {err}. "
            + (
                "It draws random numbers in forward, so it cannot be replayed one example at a time; "
                if random
                else ""
            )
            + "Register a rule with vr_mcmc.per_example.register_rule, or freeze its parameters "
            "(requires_grad_(False))."
        ) from err

    for k, out in zip(live, recomputed):
        # A tensor changed in place after forward (an in-place activation) cannot be compared.
        if outputs[k]._version == versions[k] and not _reproduces(out.squeeze(1), outputs[k].detach()):
            raise MixedExamplesError(
                f"layer '{name}' ({type(module).__name__}) gives a different output when run on one example "
                "at a time than on the batch: it mixes examples (or its batch dimension is not dim 0), so "
                "per-example gradients through it are undefined. Use a per-example layer (e.g. LayerNorm or "
                "GroupNorm instead of batch statistics; batch_first=True for attention)."
            )
    return {n: Dense(g) for n, g in grads.items()}
