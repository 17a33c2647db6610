"""The registry of per-example gradient rules, one rule per layer type (as Opacus does).

A rule is a function ``rule(module, inputs, grad_output) -> {param_name: PerExampleGradient}``
called once per call of the module: ``inputs`` are the positional arguments of that call
(detached) and ``grad_output`` is dL/dZ of the backpropagated loss L at the module's output,
[B, ...]. Example i's rows of dL/dZ depend on example i alone, so the rule's per-example
gradients are those of L; the engine rescales them to ℓ_i (undoing a "mean" reduction). It
returns a representation for each of the module's own trainable parameters (names as in
``module.named_parameters()``).

A layer whose examples are not dimension 0 of its first input (EmbeddingBag with a flat input
and ``offsets``: one example per bag) registers a ``batch_size(module, inputs) -> int`` with its
rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .representations import PerExampleGradient

__all__ = ["BatchSize", "Rule", "covers_children", "find_batch_size", "find_rule", "register_rule"]

Rule = Callable[[nn.Module, tuple, torch.Tensor], dict[str, PerExampleGradient]]

BatchSize = Callable[[nn.Module, tuple], int]

_RULES: dict[type[nn.Module], Rule] = {}
_BATCH_SIZES: dict[type[nn.Module], BatchSize] = {}
_WHOLE: set[type[nn.Module]] = set()  # rules that cover the parameters of the module's children too
_APPLIES: dict[type[nn.Module], Callable[[nn.Module], bool]] = {}


def register_rule(
    *layer_types: type[nn.Module],
    batch_size: BatchSize | None = None,
    children: bool = False,
    applies: Callable[[nn.Module], bool] | None = None,
) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule`` for the given layer types (replacing an earlier rule).

    ``batch_size(module, inputs)``: the number of examples in a call, for layers whose examples
    are not dimension 0 of the first input (default: that dimension's size). ``children=True``: the
    rule also returns the gradients of its children's parameters (a forward that uses them directly,
    as MultiheadAttention uses ``out_proj.weight``), which then get no rule of their own.
    ``applies(module)``: whether the rule covers this module's configuration; where it does not,
    the module goes through the torch.func fallback.

    Example::

        @register_rule(MyScale)
        def _my_scale(module, inputs, grad_output):
            x = inputs[0]
            return {"scale": Dense((grad_output * x).flatten(2).sum(-1))}
    """
    if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
        raise TypeError("register_rule takes one or more nn.Module subclasses")

    def decorate(rule: Rule) -> Rule:
        for t in layer_types:
            _RULES[t] = rule
            if batch_size is None:
                _BATCH_SIZES.pop(t, None)
            else:
                _BATCH_SIZES[t] = batch_size
            if children:
                _WHOLE.add(t)
            else:
                _WHOLE.discard(t)
            if applies is None:
                _APPLIES.pop(t, None)
            else:
                _APPLIES[t] = applies
        return rule

    return decorate


def _applicable(cls: type[nn.Module], module: nn.Module) -> type[nn.Module] | None:
    applies = _APPLIES.get(cls)
    return cls if applies is None or applies(module) else None


def _registered_type(module: nn.Module) -> type[nn.Module] | None:
    cls = type(module)
    if cls in _RULES:
        return _applicable(cls, module)
    for base in cls.__mro__[1:]:
        # A subclass that keeps the parent's forward computes the same function, so the parent's
        # rule holds (e.g. MultiheadAttention's NonDynamicallyQuantizableLinear). One that
        # overrides forward gets the generic fallback instead.
        if base in _RULES and cls.forward is base.forward:
            return _applicable(base, module)
    return None


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``: its type's, or an ancestor type's if ``forward`` is not overridden."""
    found = _registered_type(module)
    return None if found is None else _RULES[found]


def find_batch_size(module: nn.Module) -> BatchSize | None:
    """The ``batch_size`` function registered with ``module``'s rule, if any."""
    found = _registered_type(module)
    return None if found is None else _BATCH_SIZES.get(found)


def covers_children(module: nn.Module) -> bool:
    """Whether ``module``'s rule covers its children's parameters as well (registered with ``children=True``)."""
    found = _registered_type(module)
    return found is not None and found in _WHOLE
