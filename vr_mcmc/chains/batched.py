"""One loss and gradient computation for C chains at once: the user's ``loss_fn(model, batch)`` on parameters stacked
with a leading chain dimension, through `torch.func.functional_call` under `torch.vmap` (DESIGN.md §13).

`BatchedGradients` gives, per step, each chain's batch loss, the gradient of its batch loss (what ``loss.backward()``
leaves in ``.grad`` in a sequential chain) and, when asked, every chain's per-example gradients, stacked
(`StackedPerExample`): for a model whose parameters all belong to ``nn.Linear`` layers called once each, the
engine's own `Factored` form (layer inputs A and output gradients dZ, the latter from zero "probes" added to each
layer's output, so one batched backward gives them), otherwise `Dense` per-example gradients from vmap over chains
of vmap over examples.

Each of these computations is built once per group of chains and, with ``compile=True``, run through
`torch.compile` (`CompiledOnce`): on a small model the eager transforms (vmap, grad, functional_call's parameter
swap, decompositions of the loss under vmap) cost 1–2 ms a step whatever the arithmetic, ten times a compiled
step's time (benchmarks/RESULTS.md, "Vectorized chains").
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from ..per_example.representations import Dense, Factored, PerExampleGradient

__all__ = ["BatchedGradients", "CompiledOnce", "StackedPerExample", "VectorizeError"]


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


class CompiledOnce:
    """``fn`` through `torch.compile`, for the argument shapes of its first call (``key``); other shapes (an
    epoch's last, smaller batch; chains resumed behind the others) run ``fn`` eager, so a run compiles once (a
    recompilation costs as much as the first: seconds). A compilation that fails gives one warning and eager
    calls from then on; an error that eager ``fn`` raises too is the caller's (a model vmap cannot batch).

    Each instance compiles a fresh code object: torch.compile caches per code object and falls back to eager after
    a few recompilations, which one code object shared by every group of every run would reach.
    """

    def __init__(self, fn: Callable, what: str):
        self.eager, self.what = fn, what
        self.key: Any = None
        self.failed = False
        self.calls = 0  # compiled calls made
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
        self._compiled = torch.compile(fresh, dynamic=False)

    def __call__(self, key: Any, *args: Any) -> Any:
        if self.failed or key is None:  # None: the caller's choice of eager for this call
            return self.eager(*args)
        if self.key is None:
            self.key = key
        if key != self.key:
            return self.eager(*args)
        if self.calls:
            return self._compiled(*args)
        try:
            out = self._compiled(*args)
        except Exception as exc:  # any failure of the compiler: eager decides what is wrong
            out = self.eager(*args)  # raises the model's own error if it has one
            self.failed = True
            warnings.warn(f"vectorized chains: torch.compile of the batched {self.what} failed, running it eager "
                          f"(same results, 1-2 ms slower a step on small models): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}", RuntimeWarning, stacklevel=4)
            return out
        self.calls += 1
        return out


def _leaves(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New autograd leaves on the same storage (the backward's gradients are theirs alone)."""
    return {k: v.detach().requires_grad_() for k, v in tensors.items()}


class StackedPerExample:
    """Every chain's per-example gradients of one step, stacked with a leading chain dimension: per parameter name
    either ``("dense", G)`` with G [C, B, *shape], or ``("factored", A, dZ, shape)`` with A [C, B, 1, T, d_in],
    dZ [C, B, 1, T, d_out] (`Factored`'s layout after the chain dimension; g_ci = Σ_t dZᵀ A), and for dense
    entries built from per-position terms ``terms`` [C, B, T, *shape]."""

    def __init__(self, entries: dict[str, tuple], terms: dict[str, torch.Tensor] | None = None):
        self.entries = entries
        self.terms = terms or {}

    def __len__(self) -> int:
        first = next(iter(self.entries.values()))
        return first[1].shape[0]

    def dense(self, name: str) -> torch.Tensor:
        """[C, B, *shape]: the per-example gradients of ``name`` as one tensor."""
        entry = self.entries[name]
        if entry[0] == "dense":
            return entry[1]
        _, a, dz, shape = entry
        c, b = a.shape[:2]
        return torch.matmul(dz.transpose(-1, -2), a).reshape(c, b, *shape)

    def chain(self, k: int) -> dict[str, PerExampleGradient]:
        """Chain k's {name: representation}, views of the stacked tensors (what its engine would give)."""
        out: dict[str, PerExampleGradient] = {}
        for name, entry in self.entries.items():
            if entry[0] == "dense":
                terms = self.terms.get(name)
                out[name] = Dense(entry[1][k], None if terms is None else terms[k])
            else:
                out[name] = Factored(entry[1][k], entry[2][k], entry[3])
        return out


class BatchedGradients:
    """Loss, batch gradient and (optionally) per-example gradients of C chains in one computation.

    ``template``: a model of the chains' architecture (its own parameter values are never used: functional_call
    replaces them with each chain's); ``names``: the trainable parameters, in order; ``loss_reduction``: how the
    loss reduces over the batch ("mean" or "sum"), to undo as the engine does; ``compile``: run each computation
    through `torch.compile` (`CompiledOnce`) for batches of ``batch_size`` examples (None: the first batch's), others
    (an epoch's last batch) eager, so that a resumed run computes each step as the uninterrupted run did.
    """

    def __init__(self, template: nn.Module, loss_fn: Callable, names: list[str], loss_reduction: str = "mean",
                 compile: bool = False, batch_size: int | None = None):
        self.module = _LossModule(template, loss_fn)
        self.names = list(names)
        self.loss_reduction = loss_reduction
        self.compile = compile
        self.batch_size = batch_size
        owners = {f"{m}.{p}" if m else p: (m, mod) for m, mod in template.named_modules()
                  for p, _ in mod.named_parameters(recurse=False)}
        linear = {m: mod for n, (m, mod) in owners.items() if n in self.names and isinstance(mod, nn.Linear)}
        # the factored path needs every trainable parameter in a Linear layer (others would need a second pass)
        self.factored = all(n in owners and isinstance(owners[n][1], nn.Linear) for n in self.names)
        self._probes = _Probes(linear) if self.factored else None
        self._fns: dict[str, Callable] = {}

    # -- the computations, built once ---------------------------------------------------------------------------

    def _loss(self) -> Callable:
        module = self.module

        def loss(p: dict, f: dict, b: tuple) -> torch.Tensor:
            return functional_call(module, ({"model." + k: v for k, v in p.items()},
                                            {"model." + k: v for k, v in f.items()}), (b,))

        return loss

    def _build(self, kind: str) -> Callable:
        loss = self._loss()
        if kind == "dense":
            def one(p: dict, f: dict, example: tuple) -> dict:
                return grad(loss)(p, f, tuple(t.unsqueeze(0) for t in example))

            def fn(p: dict, f: dict, b: tuple) -> tuple:
                grads, value = vmap(grad_and_value(loss))(p, f, b)
                return grads, value, vmap(vmap(one, in_dims=(None, None, 0)))(p, f, b)

            return CompiledOnce(fn, "gradient") if self.compile else (lambda key, *args: fn(*args))
        in_dims = (0, 0, None if kind == "shared" else 0)  # "shared": one batch for every chain (full data)
        if kind == "factored":
            module, probes = self.module, self._probes

            def probed(p: dict, f: dict, z: dict, x: tuple) -> tuple[torch.Tensor, tuple[torch.Tensor, dict]]:
                with probes.capture(z):
                    value = functional_call(module, ({"model." + k: v for k, v in p.items()},
                                                     {"model." + k: v for k, v in f.items()}), (x,))
                    inputs = dict(probes.inputs)
                probes.inputs = {}  # no tensor of the transform may outlive it (torch.compile traces this too)
                return value, (value, inputs)

            if self.compile:
                return CompiledOnce(vmap(grad(probed, argnums=(0, 2), has_aux=True)), "gradient")
            forward = vmap(lambda p, f, z, x: probed(p, f, z, x)[1])

            def eager_factored(key: Any, p: dict, f: dict, z: dict, x: tuple) -> tuple:
                p, z = _leaves(p), _leaves(z)
                value, inputs = forward(p, f, z, x)
                found = torch.autograd.grad(value.sum(), [*p.values(), *z.values()])
                grads, dz = dict(zip(p, found[: len(p)])), dict(zip(z, found[len(p):]))
                return (grads, dz), (value.detach(), {n: t.detach() for n, t in inputs.items()})

            return eager_factored
        if self.compile:
            return CompiledOnce(vmap(grad_and_value(loss), in_dims=in_dims), "gradient")
        # eager: the forward under vmap, then one plain backward of the chains' summed losses (each chain's loss
        # depends on its own slice only, so the gradient's slice c is chain c's): torch.func's grad transform
        # costs ~0.5 ms a call more on a small model
        forward = vmap(loss, in_dims=in_dims)

        def eager(key: Any, p: dict, f: dict, b: tuple) -> tuple:
            p = _leaves(p)
            value = forward(p, f, b)
            return dict(zip(p, torch.autograd.grad(value.sum(), list(p.values())))), value.detach()

        return eager

    def _fn(self, kind: str) -> Callable:
        fn = self._fns.get(kind)
        if fn is None:
            fn = self._fns[kind] = self._build(kind)
        return fn

    # -- one step -------------------------------------------------------------------------------------------

    def compute(self, trainable: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor], batch: tuple,
                per_example: bool, shared: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], StackedPerExample | None]:
        """(loss [C], {name: gradient [C, *shape]}, every chain's per-example gradients or None).

        ``trainable``/``fixed``: stacked [C, ...] tensors (parameters with gradients; frozen parameters and
        buffers), plain dicts; ``batch``: the chains' batches stacked [C, B, ...], or with ``shared`` one batch
        [B, ...] that every chain sees (the full data of the closure samplers)."""
        key = tuple(t.shape for t in batch)
        if not shared and self.batch_size is not None and batch[0].shape[1] != self.batch_size:
            key = None  # not the run's batch size (an epoch's last batch): eager, whatever the run's first batch was
        if per_example and self.factored and not shared:
            return self._factored(trainable, fixed, batch, key)
        if not per_example:
            grads, value = self._fn("shared" if shared else "batch")(key, trainable, fixed, batch)
            return value, grads, None
        grads, value, per = self._fn("dense")(key, trainable, fixed, batch)
        return value, grads, StackedPerExample({n: ("dense", per[n]) for n in self.names})

    def _factored(self, trainable, fixed, batch, key):
        probes = self._probes
        if not probes.shapes:  # the output shape of each layer, from one plain forward of chain 0
            with torch.no_grad(), probes.capture({}):
                self._loss()({k: v[0] for k, v in trainable.items()}, {k: v[0] for k, v in fixed.items()},
                             tuple(t[0] for t in batch))
            many = [n for n, k in probes.calls.items() if k != 1]
            if many:  # a layer called twice would need its probes summed per call: take the dense path
                self.factored = False
                return self.compute(trainable, fixed, batch, True)
        first = next(iter(trainable.values()))
        c, b = first.shape[0], batch[0].shape[1]
        # a layer's output is [B, ..., d_out] (the batch in dimension 0, as the engine requires)
        zeros = {n: torch.zeros((c, b, *s[1:]), dtype=first.dtype, device=first.device)
                 for n, s in probes.shapes.items()}
        (grads, dz), (value, inputs) = self._fn("factored")(key, trainable, fixed, zeros, batch)
        scale = b if self.loss_reduction == "mean" else 1  # per-example gradients of the batch *mean*: ×B
        entries: dict[str, tuple] = {}
        terms: dict[str, torch.Tensor] = {}
        for name, layer in probes.modules.items():
            prefix = f"{name}." if name else ""
            a = inputs[name].reshape(c, b, -1, layer.in_features)
            z = dz[name].reshape(c, b, -1, layer.out_features)
            if scale != 1:
                z = z * scale
            if prefix + "weight" in self.names:  # the engine's choice (rules.linear.factored_or_dense)
                t = a.shape[2]
                entry = ("factored", a.unsqueeze(2), z.unsqueeze(2), tuple(layer.weight.shape))
                if t * (layer.in_features + layer.out_features) > math.prod(layer.weight.shape):
                    entry = ("dense", torch.matmul(z.transpose(-1, -2), a).reshape(c, b, *layer.weight.shape))
                entries[prefix + "weight"] = entry
            if layer.bias is not None and prefix + "bias" in self.names:
                entries[prefix + "bias"] = ("dense", z.sum(2))
                terms[prefix + "bias"] = z
        return value, grads, StackedPerExample(entries, terms)
