"""`PerExampleGradients`: per-example gradients of a model from one ordinary forward/backward pass."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .consistency import SPOT_CHECK_EVERY, SPOT_CHECK_FIRST, ConsistencyCheck, release_terms
from .errors import MixedExamplesError, PerExampleError
from .fallback import fallback_rule, flat_tensors
from .packed import is_packed_call, packed_batch_size, packed_rnn_rule
from .registry import BatchSize, Rule, covers_children, find_batch_size, find_rule
from .representations import Dense, PerExampleGradient, combine

__all__ = ["PerExampleGradients", "sq_norms"]

_REDUCTIONS = ("mean", "sum")


@dataclass
class _Call:
    """What one call of a module leaves behind: its inputs, its outputs and their gradients."""

    args: tuple
    kwargs: dict
    arg_versions: list[int]
    outputs: list[torch.Tensor]
    versions: list[int]
    batch_size: int
    shared: frozenset = frozenset()  # positions / names of arguments that are model tensors
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype) if run under autocast
    grads: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class _Unit:
    """A module whose trainable parameters get per-example gradients from one rule (or the fallback)."""

    name: str
    module: nn.Module
    rule: Rule | None
    params: dict[str, nn.Parameter]
    signature: inspect.Signature | None = None
    batch_size: BatchSize | None = None  # the rule's count of examples in a call, if not dim 0 of the input
    calls: list[_Call] = field(default_factory=list)


def _leading_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return a
    return None


def _leading_size(args: tuple, kwargs: dict) -> int | None:
    t = _leading_tensor(args, kwargs)
    return None if t is None else t.shape[0]


def _detached(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, PackedSequence):
        return a._replace(data=a.data.detach())
    return a


def _autocast_state(device_type: str) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the autocast region in force, or None (torch >= 2.4 and older APIs)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return device_type, torch.get_autocast_dtype(device_type)
    return device_type, torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


_SEQUENCE_FIRST = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)


def _refuse_sequence_first(model: nn.Module) -> None:
    """Refuse trainable recurrent, attention and transformer modules built with ``batch_first=False``."""
    for name, module in model.named_modules():
        if not isinstance(module, _SEQUENCE_FIRST) or getattr(module, "batch_first", True):
            continue
        if any(p.requires_grad for p in module.parameters()):
            where = f"'{name}'" if name else "the model"
            raise PerExampleError(
                f"layer {where} ({type(module).__name__}) has batch_first=False: it takes the sequence in dimension "
                "0 and the batch in dimension 1, while per-example gradients need the batch in dimension 0 of every "
                "layer input (the batch must be dimension 0). Construct it with batch_first=True (and feed it "
                "[B, T, ...]; a PackedSequence input is the same either way), or freeze it (requires_grad_(False))."
            )


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
    it is ``Σ_i ℓ_i``. Either way ``Σ_i g_i`` equals the gradient of the backward pass times B
    (mean) or 1 (sum); with ``check=True`` (the default) `collect` verifies this for every
    parameter by random probes and raises rather than return per-example gradients that do not
    add up (about 0.1 ms per parameter on a CPU; ``check=False`` skips it in a hot loop once a
    model is known to be covered). The samplers keep the check's cost in proportion by running
    it as a spot check: on their first 8 steps, then every 64th (``collect(check=False)`` between;
    see `vr_mcmc.estimators.base.Estimator.spot_check_due` for what that still detects).

    The batch is dimension 0 of every layer input. A batch is what the forwards (with gradients
    enabled) between two backward passes computed: the model may be called several times per
    loss. Layers with a registered rule (Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm,
    RMSNorm, InstanceNorm, BatchNorm in eval mode) are computed from their saved input and output
    gradient; any other module with parameters goes through torch.func on its saved input (each
    example replayed alone under vmap, which also checks that the module does not mix examples;
    after the engine's first 8 batches, and but for every 64th, one replay of the whole batch and
    one batched backward of per-example masked output gradients: the same gradients at a third of
    the cost on a small module, see `fallback.fallback_rule`'s ``verify``).
    BatchNorm on batch statistics mixes examples and raises `MixedExamplesError` when it runs
    (`vr_mcmc.per_example.replace_batchnorm` or `freeze_batchnorm` make a model acceptable).

    The representations returned hold views of the batch's activations: they stay valid until
    the inputs are modified in place.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", *, check: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerExampleGradients needs an nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be 'mean' or 'sum' (how the backpropagated loss reduces over the batch), "
                f"got {loss_reduction!r}"
            )
        self.model = model
        self.loss_reduction = loss_reduction
        self.check = check
        # Per parameter, the last check's gap in units of its tolerance (> 1 fails).
        self.check_ratios: dict[str, float] = {}
        self._units: list[_Unit] = []
        self._handles: list[Any] = []
        self._replaying = False  # the fallback replays modules; their hooks must not record that
        self._grads_arrived = False  # a backward pass reached the hooks: the next forward starts a batch
        self._model_batch_size: int | None = None
        self._model_input: torch.Tensor | None = None  # the tensor that set _model_batch_size
        # Tensors of this batch known to hold the examples in dimension 0 (the model's input, layer
        # outputs), by weak reference: a rule layer's input that is a view of one must keep them there.
        self._batch_major: list[weakref.ref] = []
        self._param_grads: dict[str, torch.Tensor] = {}
        self._consistency = ConsistencyCheck()
        self._model_tensors: dict[int, torch.Tensor] = {}
        self._modules = list(model.modules())  # for the per-batch refresh of _model_tensors
        self._collects = 0  # batches collected (the spot-check schedule of the fallback's replays)
        self._verify_replays = True
        self.clear()
        _refuse_sequence_first(model)
        self._find_units(model, "")
        # One name per trainable parameter, in model order (a tied parameter keeps its first name).
        self.parameter_names: dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for unit in self._units:
            self._handles.append(
                unit.module.register_forward_hook(partial(self._on_forward, unit), with_kwargs=True)
            )
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(partial(self._refuse_batch_stats, name)))
        for name, p in self.parameter_names.items():
            self._handles.append(p.register_hook(partial(self._store_param_grad, name)))

    # -- discovery -----------------------------------------------------------------------------

    def _find_units(self, module: nn.Module, name: str) -> None:
        rule = None if parametrize.is_parametrized(module) else find_rule(module)
        whole = rule is not None and covers_children(module)
        own = {n: p for n, p in module.named_parameters(recurse=whole) if p.requires_grad}
        if rule is not None:
            if own:
                self._units.append(
                    _Unit(name, module, rule, own, inspect.signature(module.forward), find_batch_size(module))
                )
            if whole:
                return
        elif own or parametrize.is_parametrized(module):
            # No rule: the fallback differentiates the whole module, children included, since its
            # forward may use its children's parameters directly (as MultiheadAttention does, and
            # as a parametrized weight is computed from its parametrization's parameters).
            everything = {n: p for n, p in module.named_parameters() if p.requires_grad}
            if everything:
                self._units.append(_Unit(name, module, None, everything))
            return
        for child_name, child in module.named_children():
            self._find_units(child, f"{name}.{child_name}" if name else child_name)

    # -- hooks ---------------------------------------------------------------------------------

    def _start_batch_if_done(self) -> None:
        if self._grads_arrived:
            self.clear()

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not self._replaying:
            self._start_batch_if_done()
            if self._model_batch_size is None:
                self._model_input = _leading_tensor(args, kwargs)
                self._model_batch_size = None if self._model_input is None else self._model_input.shape[0]
                if self._model_input is not None:
                    self._batch_major.append(weakref.ref(self._model_input))

    def _refuse_batch_stats(self, name: str, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and _uses_batch_statistics(module):
            raise MixedExamplesError(
                f"layer '{name}' ({type(module).__name__}) normalizes with batch statistics, which mixes "
                "the examples of a batch, so per-example gradients are undefined. Replace it with GroupNorm "
                "(vr_mcmc.per_example.replace_batchnorm(model)), or fix its running statistics "
                "(vr_mcmc.per_example.freeze_batchnorm(model, inputs=...) estimates them once and keeps the layer "
                f"in eval mode; model.get_submodule('{name}').eval() uses the ones it holds)."
            )

    def _store_grad(self, call: _Call, k: int, grad: torch.Tensor) -> None:
        self._grads_arrived = True
        # Two backward passes through one retained graph add up, as .grad does.
        call.grads[k] = grad if call.grads[k] is None else call.grads[k] + grad

    def batch_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient from the backward passes of the current batch, as the hooks saw it (what
        ``.grad`` holds when it was zeroed before the batch); names as in `collect`."""
        return dict(self._param_grads)

    def _store_param_grad(self, name: str, grad: torch.Tensor) -> None:
        self._grads_arrived = True
        previous = self._param_grads.get(name)
        self._param_grads[name] = grad if previous is None else previous + grad

    def _on_forward(self, unit: _Unit, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not torch.is_grad_enabled() or self._replaying:
            return
        outputs = flat_tensors(output)
        if not any(t.requires_grad for t in outputs):
            return
        self._start_batch_if_done()
        if unit.rule is not None and kwargs:
            # Rules read positional inputs: fc(input=x) is fc(x), bag(x, per_sample_weights=w) is bag(x, None, w).
            bound = unit.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = (*bound.args, *bound.kwargs.values())
            kwargs = {}
        packed = unit.rule is None and is_packed_call(module, args)
        batch_size = packed_batch_size(args[0]) if packed else _leading_size(args, kwargs)
        if unit.batch_size is not None and batch_size is not None:
            own = unit.batch_size(module, args)
            if own != batch_size and self._model_input is not None and args[0] is self._model_input:
                # The model's input is the flat lookups of bags (EmbeddingBag with offsets): the bags are the batch.
                self._model_batch_size = own
            batch_size = own
        if batch_size is None:
            raise PerExampleError(
                f"layer '{unit.name}' ({type(module).__name__}) was called without a batched tensor input; "
                "per-example gradients need inputs whose dimension 0 is the batch"
            )
        if unit.rule is not None and self._is_model_tensor(args[0]):
            raise PerExampleError(
                f"layer '{unit.name}' ({type(module).__name__}) was applied to a parameter or buffer of the "
                "model, a tensor shared by all examples, so its gradient cannot be split by example. Apply "
                "layers to batched inputs (e.g. make a positional table an nn.Parameter added to the input)."
            )
        if unit.rule is not None and batch_size > 1:
            self._refuse_transposed(unit, args[0], batch_size)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        fallback = unit.rule is None
        call = _Call(
            args=tuple(_detached(a) for a in args),
            kwargs={k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
            arg_versions=[t._version for t in tensors],
            outputs=outputs if fallback else [],
            versions=[t._version for t in outputs] if fallback else [],
            batch_size=batch_size,
            shared=frozenset(k for k, a in (*enumerate(args), *kwargs.items()) if self._is_model_tensor(a)),
            autocast=_autocast_state(outputs[0].device.type),
            grads=[None] * len(outputs),
        )
        for k, t in enumerate(outputs):
            if t.requires_grad:
                # A tensor hook sees dL/dZ of this very output, even if an in-place op changes it later.
                t.register_hook(partial(self._store_grad, call, k))
        unit.calls.append(call)
        if outputs[0].dim() >= 1 and outputs[0].shape[0] == batch_size:
            self._batch_major.append(weakref.ref(outputs[0]))

    def _refuse_transposed(self, unit: _Unit, x: Any, batch_size: int) -> None:
        """Refuse a view of a batch-major tensor whose examples are not in dimension 0 (e.g. ``h.transpose(0, 1)``
        with as many time steps as examples, which the size check cannot tell apart)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.layout != torch.strided:
            return
        storage = x.untyped_storage().data_ptr()
        for ref in self._batch_major:
            known = ref()
            if known is None or known.dim() < 1 or known.shape[0] != batch_size or known.layout != torch.strided:
                continue
            if known.untyped_storage().data_ptr() != storage:
                continue
            step = known.stride(0)
            moved = [d for d in range(1, x.dim()) if x.shape[d] == batch_size and x.stride(d) == step]
            if x.stride(0) != step and moved:
                raise PerExampleError(
                    f"layer '{unit.name}' ({type(unit.module).__name__}) was applied to a view of the batch whose "
                    f"examples are in dimension {moved[0]}, not 0 (e.g. a transposed, time-major activation "
                    f"[T, B, ...] with T = B = {batch_size}): its per-example gradients would group the wrong "
                    "entries. The batch must be dimension 0 of every layer input: keep activations batch-major "
                    "(batch_first=True)."
                )

    def _is_model_tensor(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self._model_tensors.get(id(t)) is t

    # -- results -------------------------------------------------------------------------------

    def collect(self, *, check: bool | None = None) -> dict[str, PerExampleGradient]:
        """Per-example gradients of the last batch, one representation per trainable parameter.

        Keys are parameter names as in ``model.named_parameters()``. A parameter that took no part
        in the loss gets zeros (stored as one broadcast element). ``check``: run the consistency
        check on this batch (default: the engine's ``check``); samplers pass False on the steps
        between their spot checks (`vr_mcmc.estimators.base.Estimator.spot_check_due`).
        """
        if not self.parameter_names:
            return {}
        live = [(unit, call) for unit in self._units for call in unit.calls if any(g is not None for g in call.grads)]
        if not live and not self._param_grads:
            raise PerExampleError(
                "no gradients were captured: run a forward pass of the model with gradients enabled and "
                "loss.backward() before collect()"
            )
        if self._model_batch_size is not None:
            batch_size = self._model_batch_size
        elif live:
            batch_size = live[0][1].batch_size
        else:
            raise PerExampleError(
                "the backward pass reached parameters but no layer's output: parameters used outside the "
                "forward of their modules get no per-example gradients"
            )
        for unit, call in live:
            if call.batch_size != batch_size:
                raise PerExampleError(
                    f"layer '{unit.name}' saw {call.batch_size} in dimension 0 of its input where the batch has "
                    f"{batch_size} examples: the batch must be dimension 0 of every layer input (e.g. "
                    "batch_first=True for recurrent and attention layers), and a layer must not be applied to "
                    "a tensor shared by all examples"
                )
            tensors = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(t._version != v for t, v in zip(tensors, call.arg_versions)):
                raise PerExampleError(
                    f"the input of layer '{unit.name}' was modified in place after the forward pass; collect() "
                    "needs the inputs as they were (copy the next batch into a new tensor instead)"
                )
        # The fallback's check that a module does not mix examples (a replay of each example alone) runs as a spot
        # check: a module mixes examples by its structure, on every batch, so the first batch shows it.
        self._collects += 1
        self._verify_replays = self._collects <= SPOT_CHECK_FIRST or self._collects % SPOT_CHECK_EVERY == 0
        checking = self.check if check is None else check
        per_param: dict[int, list[PerExampleGradient]] = {}
        low_eps: dict[int, float] = {}
        if batch_size > 0:
            for unit, call in live:
                for local, rep in self._unit_grads(unit, call).items():
                    key = id(unit.params[local])
                    per_param.setdefault(key, []).append(rep)
                    if checking:  # the lowest precision the call's operands had: its output gradients' or autocast's
                        low = max(torch.finfo(g.dtype).eps for g in call.grads if g is not None)
                        if call.autocast is not None:
                            low = max(low, torch.finfo(call.autocast[1]).eps)
                        low_eps[key] = max(low_eps.get(key, 0.0), low)
        out: dict[str, PerExampleGradient] = {}
        for name, p in self.parameter_names.items():
            reps = per_param.get(id(p))
            if reps is None:
                out[name] = Dense.zeros(batch_size, p.shape, dtype=p.dtype, device=p.device)
            else:
                out[name] = reps[0] if len(reps) == 1 else combine(reps)
        if checking:
            try:
                self._consistency.run(
                    out, self.parameter_names, self._param_grads,
                    {n: low_eps.get(id(p), 0.0) for n, p in self.parameter_names.items()}, self.loss_reduction,
                )
            finally:
                self.check_ratios = dict(self._consistency.ratios)
        release_terms(out)
        return out

    def _unit_grads(self, unit: _Unit, call: _Call) -> dict[str, PerExampleGradient]:
        if unit.rule is None:
            self._replaying = True
            try:
                if is_packed_call(unit.module, call.args):
                    found = packed_rnn_rule(
                        unit.module, unit.name, call.args, call.kwargs, call.outputs, call.grads, fallback_rule,
                        autocast=call.autocast,
                    )
                else:
                    found = fallback_rule(
                        unit.module, unit.name, call.args, call.kwargs, call.outputs, call.versions, call.grads,
                        call.batch_size, shared=call.shared, autocast=call.autocast, verify=self._verify_replays,
                    )
            finally:
                self._replaying = False
        elif call.grads[0] is None:
            return {}
        else:
            dtype = next(iter(unit.params.values())).dtype
            # Under autocast a layer's input and output gradient may be in a lower precision than its
            # parameters; per-example gradients are formed in the parameters' dtype, as .grad is.
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in call.args)
            found = unit.rule(unit.module, args, call.grads[0].to(dtype))
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
        # Refreshed per batch, as a buffer may be reassigned. Holding the tensors (not just their ids)
        # keeps an id from being reused by an activation within the batch.
        self._model_tensors = {id(t): t for m in self._modules for t in (*m._parameters.values(), *m._buffers.values())
                               if t is not None}
        self._param_grads.clear()
        self._grads_arrived = False
        self._model_batch_size = None
        self._model_input = None
        self._batch_major = []

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
