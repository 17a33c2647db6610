"""Checks before any sampling: the chains' models and samplers, what is recorded, and the run's fingerprint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..recorder import Recorder
from .loader import check_data, describe, is_iterable_data
from .params import state_tensors
from .runner import build

__all__ = ["SUPPORTED", "preflight"]

SUPPORTED = ("SG samplers (torch_sample.LangevinSampler: SGLD, SAGALD, SVRGLD, SGLDCV) and closure samplers "
             "(torch_sample.ClosureSampler: ULA, MALA, HMC, NUTS)")


def preflight(spec: dict[str, Any], num_data: int, observed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Builds every chain's model (and chain 0's sampler) as the chains will, checks them and what is
    recorded, and returns the run's fingerprint {"sampler": options, "data": shapes, "model": shapes}.
    The caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        model, sampler = build(spec, 0)
        check_data(spec["data"], sampler, spec["batch_size"], spec["parallel"])
        check_sampler(sampler, num_data if num_data is not None else getattr(sampler, "num_data", None))
        check_schedule(sampler, spec["num_warmup"] + spec["num_samples"])
        architecture = _architecture(model)
        for chain in range(1, spec["num_chains"]):
            other = _architecture(build(spec, chain)[0])
            if other != architecture:
                raise ValueError(f"model_fn() built a different model for chain {chain} than for chain 0 "
                                 f"({_difference(architecture, other)}): every chain must sample the same model")
        check_recorded(Recorder(spec["record"], spec["log_likelihood"]), model, sampler, observed)
        if spec.get("keep_params"):
            state_tensors(model)  # a state dict that safetensors cannot store is refused now, not at the k-th draw
    return {"sampler": _sampler_options(sampler), "data": _data_shape(spec["data"]),
            "model": {k: list(v) for k, v in architecture.items()}}


def check_sampler(sampler: Any, num_data: int) -> None:
    from torch_sample.closure import ClosureSampler
    from torch_sample.langevin import LangevinSampler

    if not isinstance(sampler, (LangevinSampler, ClosureSampler)):
        raise TypeError(f"sampler_fn(model) returned a {type(sampler).__module__}.{type(sampler).__name__}, which "
                        f"vr_mcmc.sample cannot drive: it supports {SUPPORTED}")
    n = getattr(sampler, "num_data", None)
    if isinstance(sampler, ClosureSampler) and n == 1 and num_data > 1:
        raise ValueError(f"{type(sampler).__name__} has num_data=1 but the data has {num_data} examples: "
                         "vr_mcmc.sample gives it a closure of loss_fn on all the data, the mean NLL, which the "
                         f"sampler multiplies by num_data: set num_data={num_data}")
    if n != num_data:
        raise ValueError(f"{type(sampler).__name__} has num_data={n} but the data has {num_data} examples: "
                         f"loss_fn returns a batch mean, which the sampler scales by num_data; set num_data={num_data}")


def check_schedule(sampler: Any, steps: int) -> None:
    """A schedule with a length (torch_sample.schedules.Cyclical) must span the run: warmup and sampling steps."""
    total = getattr(getattr(sampler, "schedule", None), "total_steps", None)
    if total is not None and total != steps:
        raise ValueError(f"the sampler's schedule {sampler.schedule!r} has total_steps={total} but the run makes "
                         f"num_warmup + num_samples = {steps} steps: build it with total_steps={steps}")


def check_recorded(recorder: Recorder, model: torch.nn.Module, sampler: Any,
                   observed: Mapping[str, np.ndarray]) -> None:
    """Evaluates every recorded function once on the initial model (names, types, shapes)."""
    values = recorder.values(model, sampler)
    for name, value in values["log_likelihood"].items():
        fn = f"log_likelihood[{name!r}]" if name != "obs" else "log_likelihood"
        if value.ndim == 0:
            raise ValueError(f"{fn} returned a scalar: it must return the pointwise log-likelihood, one value per "
                             "observation (reduction='none'), for az.loo")
        target = observed.get(name)
        if target is None and len(observed) == 1 and len(values["log_likelihood"]) == 1:
            target = next(iter(observed.values()))
        if target is not None and target.ndim and value.shape[0] != target.shape[0]:
            raise ValueError(f"{fn} returned {value.shape[0]} values but observed_data has {target.shape[0]} "
                             "observations: it must return one log-likelihood per observation")


def _architecture(model: torch.nn.Module) -> dict[str, tuple]:
    out = {f"param:{k}": (*v.shape, str(v.dtype)) for k, v in model.named_parameters()}
    out.update({f"buffer:{k}": (*v.shape, str(v.dtype)) for k, v in model.named_buffers()})
    return out


def _difference(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> str:
    names = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in names[:5])


def _plain(value: Any) -> Any:
    """A JSON value that identifies an option (numbers, strings, priors by their dict, others by type)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _plain(value.item())
    if hasattr(value, "to_dict"):
        return {k: _plain(v) for k, v in value.to_dict().items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return type(value).__name__


def _sampler_options(sampler: Any) -> dict[str, Any]:
    """The class, the defaults and each param group's options, and the public scalar attributes of a fresh sampler."""
    groups = [{k: _plain(v) for k, v in g.items() if k != "params"} for g in sampler.param_groups]
    attrs = {k: _plain(v) for k, v in vars(sampler).items()
             if not k.startswith("_") and k not in ("stats", "state", "param_groups", "defaults", "adapting")
             and (v is None or isinstance(v, (bool, int, float, str)))}
    estimator = getattr(sampler, "estimator", None)
    return {"class": type(sampler).__name__, "estimator": None if estimator is None else type(estimator).__name__,
            "defaults": {k: _plain(v) for k, v in sampler.defaults.items()}, "param_groups": groups, **attrs}


def _data_shape(data: Any) -> Any:
    if is_iterable_data(data):
        return describe(data)
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return [[*t.shape, str(t.dtype)] for t in data]
    return {"type": type(data).__name__, "len": len(data)}
