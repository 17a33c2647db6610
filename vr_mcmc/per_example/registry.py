"""The registry of per-example gradient rules, one rule per layer type (as Opacus does).

A rule is a function ``rule(module, inputs, grad_output) -> {param_name: PerExampleGradient}``
called once per call of the module: ``inputs`` are the positional arguments of that call
(detached) and ``grad_output`` is dL/dZ of the backpropagated loss L at the module's output,
[B, ...]. Example i's rows of dL/dZ depend on example i alone, so the rule's per-example
gradients are those of L; the engine rescales them to ℓ_i (undoing a "mean" reduction). It
returns a representation for each of the module's own trainable parameters (names as in
``module.named_parameters()``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .representations import PerExampleGradient

__all__ = ["Rule", "find_rule", "register_rule"]

Rule = Callable[[nn.Module, tuple, torch.Tensor], dict[str, PerExampleGradient]]

_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*layer_types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule`` for the given layer types (replacing an earlier rule).

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
        return rule

    return decorate


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``: its type's, or an ancestor type's if ``forward`` is not overridden."""
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    for base in cls.__mro__[1:]:
        # A subclass that keeps the parent's forward computes the same function, so the parent's
        # rule holds (e.g. MultiheadAttention's NonDynamicallyQuantizableLinear). One that
        # overrides forward gets the generic fallback instead.
        if base in _RULES and cls.forward is base.forward:
            return _RULES[base]
    return None
