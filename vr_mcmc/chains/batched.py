"""One loss and gradient computation for C chains at once: the user's ``loss_fn(model, batch)`` on parameters stacked
with a leading chain dimension, through `torch.func.functional_call` under `torch.vmap` (DESIGN.md §13).

`BatchedGradients` gives, per step, each chain's batch loss, the gradient of its batch loss (what ``loss.backward()``
leaves in ``.grad`` in a sequential chain) and, when asked, each chain's per-example gradients as the
`vr_mcmc.per_example` representations its estimator stores: for a model whose parameters all belong to
``nn.Linear`` layers called once each, the engine's own `Factored` form (layer inputs A and output gradients dZ,
the latter from zero "probes" added to each layer's output, so one batched backward gives them), otherwise `Dense`
per-example gradients from vmap over chains of vmap over examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from ..per_example.representations import Dense, PerExampleGradient
from ..per_example.rules.linear import linear_rule

__all__ = ["BatchedGradients", "VectorizeError"]


class VectorizeError(ValueError):
    """A model, loss or sampler that ``chain_method="vectorized"`` cannot run as one batched computation."""


class _LossModule(nn.Module):
    """forward(batch) = loss_fn(model, batch): lets functional_call swap the model's parameters for one chain's."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, tuple], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: tuple) -> torch.Tensor:
        out = self.loss_fn(self.model, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise TypeError("loss_fn(model, batch) must return the batch mean NLL as a one-element tensor")
        return out.reshape(())


class _Probes:
    """Forward hooks on the template's Linear layers: keep each call's input, add a probe to its output (the
    probe's gradient is dZ). Active only inside `capture`; one call per layer."""

    def __init__(self, modules: Mapping[str, nn.Linear]):
        self.modules = dict(modules)
        self.inputs: dict[str, torch.Tensor] = {}
        self.probes: dict[str, torch.Tensor] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.probes is None:
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            self.inputs[name] = args[0]
            self.shapes[name] = tuple(output.shape)
            probe = self.probes.get(name)
            return None if probe is None else output + probe

        return hook

    @contextlib.contextmanager
    def capture(self, probes: dict[str, torch.Tensor]) -> Iterator[None]:
        self.inputs, self.calls, self.probes = {}, {}, probes
        try:
            yield
        finally:
            self.probes = None


class BatchedGradients:
    """Loss, batch gradient and (optionally) per-example gradients of C chains in one computation.

    ``template``: a model of the chains' architecture (its own parameter values are never used: functional_call
    replaces them with each chain's); ``names``: the trainable parameters, in order; ``loss_reduction``: how the
    loss reduces over the batch ("mean" or "sum"), to undo as the engine does.
    """

    def __init__(self, template: nn.Module, loss_fn: Callable, names: list[str], loss_reduction: str = "mean"):
        self.module = _LossModule(template, loss_fn)
        self.names = list(names)
        self.loss_reduction = loss_reduction
        owners = {f"{m}.{p}" if m else p: (m, mod) for m, mod in template.named_modules()
                  for p, _ in mod.named_parameters(recurse=False)}
        linear = {m: mod for n, (m, mod) in owners.items() if n in self.names and isinstance(mod, nn.Linear)}
        # the factored path needs every trainable parameter in a Linear layer (others would need a second pass)
        self.factored = all(n in owners and isinstance(owners[n][1], nn.Linear) for n in self.names)
        self._probes = _Probes(linear) if self.factored else None

    def _params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in params.items()}

    def compute(self, trainable: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor], batch: tuple,
                per_example: bool, shared: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[dict[str, Any]] | None]:
        """(loss [C], {name: gradient [C, *shape]}, per chain {name: representation} or None).

        ``trainable``/``fixed``: stacked [C, ...] tensors (parameters with gradients; frozen parameters and
        buffers); ``batch``: the chains' batches stacked [C, B, ...], or with ``shared`` one batch [B, ...] that
        every chain sees (the full data of the closure samplers)."""
        if per_example and self.factored and not shared:
            return self._factored(trainable, fixed, batch)
        module = self.module

        def loss(p: dict, f: dict, b: tuple) -> torch.Tensor:
            return functional_call(module, (self._params(p), self._params(f)), (b,))

        grads, value = vmap(grad_and_value(loss), in_dims=(0, 0, None if shared else 0))(
            dict(trainable), dict(fixed), batch)
        reps = None
        if per_example:
            def one(p: dict, f: dict, example: tuple) -> dict:
                return grad(loss)(p, f, tuple(t.unsqueeze(0) for t in example))

            per = vmap(vmap(one, in_dims=(None, None, 0)))(dict(trainable), dict(fixed), batch)
            reps = [{n: Dense(per[n][c]) for n in self.names} for c in range(value.shape[0])]
        return value, grads, reps

    def _factored(self, trainable, fixed, batch):
        module, probes = self.module, self._probes
        if not probes.shapes:  # the output shape of each layer, from one plain forward of chain 0
            with torch.no_grad(), probes.capture({}):
                functional_call(module, (self._params({k: v[0] for k, v in trainable.items()}),
                                         self._params({k: v[0] for k, v in fixed.items()})),
                                (tuple(t[0] for t in batch),))
            many = [n for n, k in probes.calls.items() if k != 1]
            if many:  # a layer called twice would need its probes summed per call: take the dense path
                self.factored = False
                return self.compute(trainable, fixed, batch, True)
        c, b = next(iter(trainable.values())).shape[0], batch[0].shape[1]
        # a layer's output is [B, ..., d_out] (the batch in dimension 0, as the engine requires)
        zeros = {n: torch.zeros((c, b, *s[1:]), dtype=trainable[f"{n}.weight" if n else "weight"].dtype,
                                device=next(iter(trainable.values())).device)
                 for n, s in probes.shapes.items()}

        def loss(p: dict, f: dict, z: dict, x: tuple) -> tuple[torch.Tensor, tuple[torch.Tensor, dict]]:
            with probes.capture(z):
                value = functional_call(module, (self._params(p), self._params(f)), (x,))
                inputs = dict(probes.inputs)
            return value, (value, inputs)

        (grads, dz), (value, inputs) = vmap(grad(loss, argnums=(0, 2), has_aux=True))(
            dict(trainable), dict(fixed), zeros, batch)
        scale = b if self.loss_reduction == "mean" else 1
        reps: list[dict[str, PerExampleGradient]] = []
        for k in range(c):
            chain: dict[str, PerExampleGradient] = {}
            for name, layer in probes.modules.items():
                prefix = f"{name}." if name else ""
                found = linear_rule(layer, (inputs[name][k],), dz[name][k])
                for local, rep in found.items():
                    if prefix + local in self.names:
                        chain[prefix + local] = rep * scale if scale != 1 else rep
            reps.append(chain)
        return value, grads, reps
