"""`PerExampleGradients`: per-example gradients of a model from one ordinary forward/backward pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .errors import MixedExamplesError, PerExampleError
from .fallback import fallback_rule, flat_tensors
from .registry import Rule, find_rule
from .representations import Dense, PerExampleGradient, combine

__all__ = ["PerExampleGradients", "sq_norms"]

_REDUCTIONS = ("mean", "sum")


@dataclass
class _Call:
    """What one call of a module leaves behind: its inputs, its outputs and their gradients."""

    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]
    versions: list[int]
    batch_size: int
    grads: list[torch.Tensor | None] = field(default_factory=list)

    def store_grad(self, k: int, grad: torch.Tensor) -> None:
        # Two backward passes through one retained graph add up, as .grad does.
        self.grads[k] = grad if self.grads[k] is None else self.grads[k] + grad


@dataclass
class _Unit:
    """A module whose trainable parameters get per-example gradients from one rule (or the fallback)."""

    name: str
    module: nn.Module
    rule: Rule | None
    params: dict[str, nn.Parameter]
    calls: list[_Call] = field(default_factory=list)


def _detach(obj: Any) -> Any:
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


def _leading_size(args: tuple, kwargs: dict) -> int | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return a.shape[0]
    return None


def _uses_batch_statistics(module: nn.Module) -> bool:
    return module.training or (module.running_mean is None and module.running_var is None)


class PerExampleGradients:
    """Per-example gradients of every trainable parameter of ``model`` after ``loss.backward()``.

    Usage::

        engine = PerExampleGradients(model, loss_reduction="mean")
        loss = F.cross_entropy(model(x), y)      # mean over the batch
        loss.backward()                          # .grad is filled as usual, untouched by the engine
        grads = engine.collect()                 # {name: Factored | Dense | RowSparse | ...}
        grads["fc.weight"].sq_norms()            # ‖g_i‖² per example

    ``g_i = ∇_θ ℓ_i`` is the gradient of example i's own loss ℓ_i: with ``loss_reduction="mean"``
    the backpropagated loss is ``(1/B) Σ_i ℓ_i`` and the engine multiplies by B; with ``"sum"``
    it is ``Σ_i ℓ_i``. Either way ``Σ_i g_i`` equals ``.grad`` times B (mean) or 1 (sum).

    The batch is dimension 0 of every layer input. Each forward of ``model`` with gradients
    enabled starts a new batch (forwards under ``torch.no_grad()`` are ignored). Layers with a
    registered rule (Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, RMSNorm, InstanceNorm,
    BatchNorm in eval mode) are computed from their saved input and output gradient; any other
    module with parameters goes through torch.func on its saved input. BatchNorm on batch
    statistics mixes examples and raises `MixedExamplesError` when it runs.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerExampleGradients needs an nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be 'mean' or 'sum' (how the backpropagated loss reduces over the batch), "
                f"got {loss_reduction!r}"
            )
        self.model = model
        self.loss_reduction = loss_reduction
        self._units: list[_Unit] = []
        self._handles: list[Any] = []
        self._replaying = False  # the fallback replays modules; their hooks must not record that
        self._find_units(model, "")
        # One name per trainable parameter, in model order (a tied parameter keeps its first name).
        self.parameter_names: dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        self._model_batch_size: int | None = None
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for unit in self._units:
            self._handles.append(
                unit.module.register_forward_hook(partial(self._on_forward, unit), with_kwargs=True)
            )
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(partial(self._refuse_batch_stats, name)))

    # -- discovery -----------------------------------------------------------------------------

    def _find_units(self, module: nn.Module, name: str) -> None:
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        rule = find_rule(module)
        if rule is not None:
            if own:
                self._units.append(_Unit(name, module, rule, own))
        elif own:
            # No rule: the fallback differentiates the whole module, children included, since its
            # forward may use its children's parameters directly (as MultiheadAttention does).
            everything = {n: p for n, p in module.named_parameters() if p.requires_grad}
            self._units.append(_Unit(name, module, None, everything))
            return
        for child_name, child in module.named_children():
            self._find_units(child, f"{name}.{child_name}" if name else child_name)

    # -- hooks ---------------------------------------------------------------------------------

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not self._replaying:
            self.clear()
            self._model_batch_size = _leading_size(args, kwargs)

    def _refuse_batch_stats(self, name: str, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and _uses_batch_statistics(module):
            raise MixedExamplesError(
                f"layer '{name}' ({type(module).__name__}) normalizes with batch statistics, which mixes "
                "the examples of a batch, so per-example gradients are undefined. Put it in eval mode "
                f"(model.get_submodule('{name}').eval() uses its running statistics) or replace it with "
                "GroupNorm or LayerNorm."
            )

    def _on_forward(self, unit: _Unit, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not torch.is_grad_enabled() or self._replaying:
            return
        outputs = flat_tensors(output)
        if not any(t.requires_grad for t in outputs):
            return
        batch_size = _leading_size(args, kwargs)
        if batch_size is None:
            raise PerExampleError(
                f"layer '{unit.name}' ({type(module).__name__}) was called without a batched tensor input; "
                "per-example gradients need inputs whose dimension 0 is the batch"
            )
        fallback = unit.rule is None
        call = _Call(
            args=tuple(_detach(a) for a in args),
            kwargs={k: _detach(v) for k, v in kwargs.items()},
            outputs=outputs if fallback else [],
            versions=[t._version for t in outputs] if fallback else [],
            batch_size=batch_size,
            grads=[None] * len(outputs),
        )
        for k, t in enumerate(outputs):
            if t.requires_grad:
                # A tensor hook sees dL/dZ of this very output, even if an in-place op changes it later.
                t.register_hook(partial(call.store_grad, k))
        unit.calls.append(call)

    # -- results -------------------------------------------------------------------------------

    def collect(self) -> dict[str, PerExampleGradient]:
        """Per-example gradients of the last batch, one representation per trainable parameter.

        Keys are parameter names as in ``model.named_parameters()``. A parameter that took no part
        in the loss gets zeros (stored as one broadcast element).
        """
        live = [(unit, call) for unit in self._units for call in unit.calls if any(g is not None for g in call.grads)]
        if not live:
            raise PerExampleError(
                "no gradients were captured: run a forward pass of the model with gradients enabled and "
                "loss.backward() before collect()"
            )
        batch_size = self._model_batch_size or live[0][1].batch_size
        for unit, call in live:
            if call.batch_size != batch_size:
                raise PerExampleError(
                    f"layer '{unit.name}' saw {call.batch_size} in dimension 0 of its input where the batch has "
                    f"{batch_size} examples: the batch must be dimension 0 of every layer input "
                    "(e.g. batch_first=True for recurrent and attention layers)"
                )
        per_param: dict[int, list[PerExampleGradient]] = {}
        for unit, call in live:
            for local, rep in self._unit_grads(unit, call).items():
                per_param.setdefault(id(unit.params[local]), []).append(rep)
        out: dict[str, PerExampleGradient] = {}
        for name, p in self.parameter_names.items():
            reps = per_param.get(id(p))
            out[name] = (
                combine(reps) if reps else Dense.zeros(batch_size, p.shape, dtype=p.dtype, device=p.device)
            )
        return out

    def _unit_grads(self, unit: _Unit, call: _Call) -> dict[str, PerExampleGradient]:
        if unit.rule is None:
            self._replaying = True
            try:
                found = fallback_rule(
                    unit.module, unit.name, call.args, call.kwargs, call.outputs, call.versions, call.grads,
                    call.batch_size,
                )
            finally:
                self._replaying = False
        elif call.grads[0] is None:
            return {}
        else:
            found = unit.rule(unit.module, call.args, call.grads[0])
            missing = [n for n in unit.params if n not in found]
            if missing:
                raise PerExampleError(
                    f"the rule for layer '{unit.name}' ({type(unit.module).__name__}) returned no gradient for "
                    f"{missing}; a rule must cover every trainable parameter of its module"
                )
        if self.loss_reduction == "mean":
            # Undo the mean's 1/B on the result, not on dZ: the result is usually the smaller tensor.
            return {n: rep * call.batch_size for n, rep in found.items()}
        return found

    def clear(self) -> None:
        """Forget the saved inputs and gradients of the last batch (frees their memory)."""
        for unit in self._units:
            unit.calls.clear()

    def remove(self) -> None:
        """Detach the engine from the model: remove every hook and saved tensor."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> PerExampleGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def layers(self) -> Iterator[tuple[str, str]]:
        """(layer name, how its per-example gradients are computed: 'rule' or 'torch.func')."""
        return ((u.name, "rule" if u.rule is not None else "torch.func") for u in self._units)


def sq_norms(grads: Mapping[str, PerExampleGradient]) -> torch.Tensor:
    """Squared norm of each example's whole gradient, ``Σ_params ‖g_i‖²``, a tensor ``[B]``."""
    reps = list(grads.values())
    if not reps:
        raise ValueError("no per-example gradients given")
    total = reps[0].sq_norms()
    for r in reps[1:]:
        total = total + r.sq_norms().to(total.dtype)
    return total
