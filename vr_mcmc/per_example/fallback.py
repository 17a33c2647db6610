"""Per-example gradients of any module through torch.func, from its saved call.

For a module without a rule, each example's gradient is the vjp of the module alone, applied to
that example's saved input and its captured output gradient, vectorized over the batch with
``vmap`` (or, for ops vmap cannot batch, looped over the examples). Nothing upstream is
recomputed. Every top-level tensor argument whose first dimension is the batch size is treated
as batched, except parameters and buffers of the model, which all examples share. Each output's
batch dimension is found by replaying one example (LSTM's ``h_n`` keeps it in dim 1).

The vjp recomputes the module's output one example at a time; it must equal the output of the
batched forward. If not, the module mixes examples (or is random), and per-example gradients
through it are undefined: that raises `MixedExamplesError` rather than returning wrong numbers.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .errors import MixedExamplesError, PerExampleError, SlowFallbackWarning, UnsupportedLayerError
from .representations import Dense, PerExampleGradient

__all__ = ["fallback_rule", "flat_tensors"]

# Modules already warned about the per-example loop (once per module, whatever the engine).
_LOOP_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# Per module, the outputs' batch dimensions by the shapes of a call (see fallback_rule).
_DIMS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
# Bound on the elements of the masked cotangents (B times the outputs' elements) of the one-replay path.
_MASKED_COTANGENT_MAX = 1 << 22
# Modules whose backward could not be batched over the masked cotangents (they take the verified path).
_NO_BATCHED_BACKWARD: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) tuple/list/dict output, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in flat_tensors(item)]
    return []


def _reproduces(recomputed: torch.Tensor, saved: torch.Tensor, compute_dtype: torch.dtype | None = None) -> Any:
    """Whether the one-example replay gives the batched output, up to the rounding of its dtype
    (or of the autocast dtype it was computed in: one example and a batch may round differently):
    a bool, or a 0-d bool tensor (the caller reads all of them with one host sync)."""
    if recomputed.shape != saved.shape:
        return False
    if not saved.dtype.is_floating_point:
        return bool(torch.equal(recomputed, saved))
    if not saved.numel():
        return True
    eps = max(torch.finfo(saved.dtype).eps, torch.finfo(compute_dtype).eps if compute_dtype else 0.0)
    tol = min(1e4 * eps, 0.1)  # mixing examples changes outputs by O(1); the cap keeps bfloat16 checkable
    # torch.allclose(recomputed, saved, rtol=tol, atol=tol·scale), without reading scale on the host
    scale = saved.abs().max().clamp_min(1.0)
    close = (recomputed - saved).abs() <= (saved.abs() + scale) * tol
    return (close | (recomputed == saved)).all()


def _batch_dim(batched: torch.Size, single: torch.Size, batch_size: int) -> int | None:
    """The dimension that holds the examples: batch_size in the batched output, 1 in a one-example replay."""
    if len(batched) != len(single):
        return None
    candidates = [
        d
        for d in range(len(batched))
        if batched[d] == batch_size and single[d] == 1
        and all(batched[e] == single[e] for e in range(len(batched)) if e != d)
    ]
    return candidates[0] if candidates else None


def _output_dims(module: nn.Module, name: str, call: Any, trainable: dict[str, torch.Tensor], slots: list,
                 batched: list[torch.Tensor], live: list[int], outputs: list[torch.Tensor],
                 batch_size: int) -> list[int]:
    """Each live output's batch dimension, found by replaying example 0 alone."""
    try:
        with torch.no_grad():
            single = call(trainable, [b[0] for b in batched])
    except Exception as err:
        sliced = ", ".join(f"{kind} {key!r} {tuple(b.shape)}" for (kind, key), b in zip(slots, batched)) or "none"
        raise UnsupportedLayerError(
            f"layer '{name}' ({type(module).__name__}) has no per-example rule, and the torch.func fallback "
            f"could not run it on one example: {type(err).__name__}: {err}. The fallback takes example i as "
            f"index i of every tensor argument whose dimension 0 is the batch's {batch_size} (here: {sliced}), "
            "so a module whose examples are laid out otherwise (e.g. flat inputs with offsets) needs a rule: "
            "register one with vr_mcmc.per_example.register_rule, or freeze its parameters (requires_grad_(False))."
        ) from err
    dims = []
    for k, one in zip(live, single):
        d = _batch_dim(outputs[k].shape, one.shape, batch_size)
        if d is None:
            raise PerExampleError(
                f"output {k} of layer '{name}' ({type(module).__name__}) has shape {tuple(outputs[k].shape)}, "
                f"with no dimension of the batch's {batch_size} examples (one example gives "
                f"{tuple(one.shape)}), yet it reaches the loss: per-example gradients through it are undefined"
            )
        dims.append(d)
    return dims


def fallback_rule(
    module: nn.Module,
    name: str,
    args: tuple,
    kwargs: dict,
    outputs: list[torch.Tensor],
    versions: list[int],
    grad_outputs: list[torch.Tensor | None],
    batch_size: int,
    shared: frozenset = frozenset(),
    autocast: tuple[str, torch.dtype] | None = None,
    verify: bool = True,
) -> dict[str, PerExampleGradient]:
    """Dense per-example gradients of ``module``'s trainable parameters (recursive names).

    ``shared``: positions and names of the arguments that all examples share (model tensors).
    ``autocast``: (device type, dtype) of the autocast region the module ran in; the replay runs
    in the same one, so that it computes what the forward computed.
    ``verify``: replay each example alone (``vmap``) and check that it reproduces the batched output
    (`MixedExamplesError` otherwise). Without it, once a call of these shapes has been replayed, and
    when the cotangents below stay small, the module is replayed once on the whole batch and example
    i's gradient is the vjp of the cotangent masked to example i's outputs, all B of them in one
    batched backward (``is_grads_batched``): the same numbers for a module that does not mix
    examples, at a third of the time on a small module (the engine verifies on a spot-check schedule).
    """
    trainable, fixed = {}, {}
    for n, p in module.named_parameters():
        (trainable if p.requires_grad else fixed)[n] = p.detach()
    buffers = dict(module.named_buffers())
    slots: list[tuple[str, Any]] = []
    batched: list[torch.Tensor] = []
    for key, a in [*enumerate(args), *kwargs.items()]:
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch_size and key not in shared:
            slots.append(("arg" if isinstance(key, int) else "kwarg", key))
            batched.append(a)
    live = [k for k, g in enumerate(grad_outputs) if g is not None]

    def call(params: dict[str, torch.Tensor], example: list[torch.Tensor]) -> list[torch.Tensor]:
        a, kw = list(args), dict(kwargs)
        for (kind, key), value in zip(slots, example):
            if kind == "arg":
                a[key] = value.unsqueeze(0)
            else:
                kw[key] = value.unsqueeze(0)
        # Clones: a module that updates a buffer in forward must not write into the model's state.
        state = {**params, **fixed, **{n: b.clone() for n, b in buffers.items()}}
        region = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
        with region:
            out = flat_tensors(functional_call(module, state, tuple(a), kw))
        return [out[k] for k in live]

    # The outputs' batch dimensions depend on shapes only: found by a one-example replay the first time a module
    # is called with these shapes, then reused (the replay is a third of this function's time on a small module).
    key = (tuple(slots), tuple((b.shape, b.dtype) for b in batched), tuple(live),
           tuple(outputs[k].shape for k in live), autocast)
    known = _DIMS.get(module)
    dims = None if known is None else known.get(key)
    if dims is None:
        dims = _output_dims(module, name, call, trainable, slots, batched, live, outputs, batch_size)
        _DIMS.setdefault(module, {})[key] = dims
    if (not verify and module not in _NO_BATCHED_BACKWARD
            and batch_size * sum(grad_outputs[k].numel() for k in live) <= _MASKED_COTANGENT_MAX):
        try:
            return _masked_cotangent_grads(module, trainable, fixed, buffers, args, kwargs, live, dims, grad_outputs,
                                           batch_size, autocast)
        except Exception:  # an op without a batching rule for its backward (e.g. aten's GRU): the verified path
            _NO_BATCHED_BACKWARD.add(module)
    cotangents = [grad_outputs[k].movedim(d, 0) for k, d in zip(live, dims)]

    def per_example(example: list[torch.Tensor], cots: list[torch.Tensor]) -> tuple[dict, list]:
        def f(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            return tuple(call(params, example))

        out, pullback = vjp(f, trainable)
        (grads,) = pullback(tuple(c.unsqueeze(d) for c, d in zip(cots, dims)))
        return grads, [o.squeeze(d) for o, d in zip(out, dims)]

    try:
        with warnings.catch_warnings():
            # vmap runs ops without a batching rule (e.g. CPU flash attention) in a loop; correct, only slower.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, recomputed = vmap(per_example, randomness="error")(batched, cotangents)
    except Exception as err:
        if "random" in str(err).lower():
            raise UnsupportedLayerError(
                f"layer '{name}' ({type(module).__name__}) has no per-example rule and draws random numbers in "
                "forward, so it cannot be replayed one example at a time. Register a rule with "
                "vr_mcmc.per_example.register_rule, or freeze its parameters (requires_grad_(False))."
            ) from err
        # Some ops have no batching rule that works (e.g. aten's GRU): the same vjp, one example at a time.
        if module not in _LOOP_WARNED:
            _LOOP_WARNED.add(module)
            warnings.warn(
                f"layer '{name}' ({type(module).__name__}) cannot be vectorized by torch.func.vmap "
                f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}); its per-example gradients "
                f"come from a Python loop of {batch_size} single-example vjp calls instead of one vectorized call, "
                f"up to about {batch_size}x slower (this warning is shown once per module). "
                "Register a rule with vr_mcmc.per_example.register_rule to avoid it.",
                SlowFallbackWarning,
                stacklevel=4,  # the caller of collect()
            )
        try:
            results = [per_example([b[i] for b in batched], [c[i] for c in cotangents]) for i in range(batch_size)]
        except Exception as loop_err:
            raise UnsupportedLayerError(
                f"layer '{name}' ({type(module).__name__}) has no per-example rule and the torch.func fallback "
                f"failed: {loop_err}. Register a rule with vr_mcmc.per_example.register_rule, or freeze its "
                "parameters (requires_grad_(False))."
            ) from loop_err
        grads = {n: torch.stack([r[0][n] for r in results]) for n in trainable}
        recomputed = [torch.stack([r[1][j] for r in results]) for j in range(len(live))]

    low = autocast[1] if autocast else None
    # A tensor changed in place after forward (an in-place activation) cannot be compared.
    same = [_reproduces(out, outputs[k].detach().movedim(d, 0), low)
            for k, d, out in zip(live, dims, recomputed) if outputs[k]._version == versions[k]]
    if same:
        tensors = [t for t in same if isinstance(t, torch.Tensor)]
        reproduced = all(t for t in same if not isinstance(t, torch.Tensor))
        if not reproduced or (tensors and not bool(torch.stack(tensors).all())):  # one host sync
            raise MixedExamplesError(
                f"layer '{name}' ({type(module).__name__}) gives a different output when run on one example "
                "at a time than on the batch: it mixes examples (or its batch dimension is not dim 0), so "
                "per-example gradients through it are undefined. Use a per-example layer (e.g. LayerNorm or "
                "GroupNorm instead of batch statistics; batch_first=True for attention)."
            )
    return {n: Dense(g) for n, g in grads.items()}


def _masked_cotangent_grads(module: nn.Module, trainable: dict, fixed: dict, buffers: dict, args: tuple, kwargs: dict,
                            live: list[int], dims: list[int], grad_outputs: list, batch_size: int,
                            autocast: tuple[str, torch.dtype] | None) -> dict[str, PerExampleGradient]:
    """Per-example gradients from one batched replay of the module and one batched backward: example i's are the
    vjp of the captured output gradients masked to example i's outputs (its index along each output's batch
    dimension). Exact when the module does not mix examples (which `fallback_rule`'s verified path checks)."""
    leaves = {n: p.detach().requires_grad_() for n, p in trainable.items()}
    state = {**leaves, **fixed, **{n: b.clone() for n, b in buffers.items()}}
    region = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
    with torch.enable_grad(), region:
        out = flat_tensors(functional_call(module, state, args, kwargs))
    outputs, cotangents = [], []
    for k, d in zip(live, dims):
        if not out[k].requires_grad:
            continue
        g = grad_outputs[k]
        eye = torch.eye(batch_size, dtype=g.dtype, device=g.device)
        shape = [1] * g.dim()
        shape[d] = batch_size
        outputs.append(out[k])
        cotangents.append(g.unsqueeze(0) * eye.view(batch_size, *shape))  # [i, ...]: g on example i's outputs
    names = list(leaves)
    found = torch.autograd.grad(outputs, [leaves[n] for n in names], cotangents, is_grads_batched=True,
                                allow_unused=True) if outputs else [None] * len(names)
    return {n: Dense(g if g is not None else torch.zeros(batch_size, *leaves[n].shape, dtype=leaves[n].dtype,
                                                           device=leaves[n].device))
            for n, g in zip(names, found)}
