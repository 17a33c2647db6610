"""What a chain records at each draw, and its assembly into ArviZ groups (DESIGN.md §7).

`Recorder` serves users who write their own loop::

    recorder = vr_mcmc.Recorder(record=["fc.weight"], log_likelihood=lambda m: pointwise_loglik(m, x_test, y_test))
    for chain in range(4):
        ...                                   # build model and sampler, warm up
        for step in range(num_samples):
            ...                               # one sampler step
            recorder.record(chain, model, sampler)
    idata = recorder.to_arviz()               # az.InferenceData on ArviZ 0.x, xarray.DataTree on ArviZ 1.x

With ``keep_params=k, directory=DIR`` every k-th draw of each chain also has its model's state dict written to
``DIR/params/`` (safetensors, atomically; see `vr_mcmc.chains.params`), and ``recorder.save_ensemble()`` (called
by ``to_arviz()`` too) writes the index that ``vr_mcmc.PosteriorEnsemble(DIR, model)`` reads.

Groups: ``posterior`` (recorded parameters and functions of the model), ``sample_stats`` (every key
of ``sampler.stats``; ``diverging`` as bool), ``log_likelihood`` (pointwise, for ``az.loo``),
``observed_data``. Dims are (chain, draw, ``<name>_dim_0``, ...).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

__all__ = ["DEFAULT_RECORD_LIMIT", "Recorder", "observed_dataset", "run_attrs", "to_arviz"]

DEFAULT_RECORD_LIMIT = 10_000
GROUPS = ("posterior", "sample_stats", "log_likelihood")


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{what} names must be non-empty strings without '/', got {name!r}")
    return name


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()
        value = value.cpu().numpy()
    try:
        out = np.array(value, copy=True)  # .numpy() of a CPU tensor shares its memory: a later step would change it
    except ValueError as exc:  # a ragged list
        raise TypeError(f"recorded value {name!r} is not a rectangular array ({exc}): its function must return a "
                        "tensor, an array or a number") from exc
    if out.dtype.kind not in "biufc":
        raise TypeError(f"recorded value {name!r} is not numeric (got {out.dtype}, e.g. {out.flat[0]!r}): its "
                        "function must return a tensor, an array or a number")
    return out


class Recorder:
    """Collects draws of one or more chains in memory; see the module docstring.

    ``record``: None (every parameter when the model has fewer than ``DEFAULT_RECORD_LIMIT``
    numbers, otherwise none, with a warning saying how to choose), a list of parameter names
    (``model.named_parameters()``), or a dict {name: fn(model) -> tensor}. ``log_likelihood``:
    fn(model) -> pointwise log-likelihood [n_obs] (stored as variable ``obs``) or a dict of them.
    ``observed_data``: {name: array}, stored as given. ``keep_params``, ``directory``: every k-th draw's
    state dict to ``directory`` (new or empty), see the module docstring.
    """

    def __init__(
        self,
        record: Sequence[str] | Mapping[str, Callable[[torch.nn.Module], Any]] | None = None,
        log_likelihood: Callable[[torch.nn.Module], Any] | Mapping[str, Callable] | None = None,
        observed_data: Mapping[str, Any] | None = None,
        *,
        keep_params: int | None = None,
        directory: str | os.PathLike | None = None,
    ):
        self.record_spec = record
        if record is not None and not isinstance(record, (Mapping, list, tuple)):
            raise TypeError("record must be None, a list of parameter names, or a dict {name: fn(model)}")
        if isinstance(record, Mapping):
            for name, fn in record.items():
                _check_name(name, "record")
                if not callable(fn):
                    raise TypeError(f"record[{name!r}] must be a function of the model, got {type(fn).__name__}")
        if log_likelihood is None:
            self.log_likelihood: dict[str, Callable] = {}
        elif callable(log_likelihood):
            self.log_likelihood = {"obs": log_likelihood}
        elif isinstance(log_likelihood, Mapping):
            self.log_likelihood = {_check_name(k, "log_likelihood"): v for k, v in log_likelihood.items()}
        else:
            raise TypeError("log_likelihood must be a function of the model or a dict {name: fn(model)}")
        self.observed_data = {_check_name(k, "observed_data"): np.asarray(v) for k, v in (observed_data or {}).items()}
        self._chains: dict[int, dict[str, dict[str, list[np.ndarray]]]] = {}
        self._resolved: dict[str, Callable] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.attrs: dict[str, Any] = {}
        self._params: dict[int, Any] = {}  # chain -> vr_mcmc.chains.params.ChainParams
        self.keep_params, self.directory = keep_params, None if directory is None else Path(directory)
        if keep_params is not None or directory is not None:
            from .chains.params import INDEX_FILE, PARAMS_DIR, check_keep_params

            check_keep_params(keep_params, directory, what="directory")
            if keep_params is None:
                raise ValueError("directory= is where keep_params=k writes parameter draws: give keep_params too")
            if self.directory.exists() and any(self.directory.iterdir()):
                held = sorted(p.name for p in self.directory.iterdir())[:5]
                what = "an ensemble" if {INDEX_FILE, PARAMS_DIR} & set(held) else "files"
                raise ValueError(f"the Recorder's directory {self.directory} already holds {what} ({', '.join(held)}): "
                                 "nothing was changed; give a new or empty directory")

    # -- what to record ---------------------------------------------------------------------------

    def resolve(self, model: torch.nn.Module) -> dict[str, Callable[[torch.nn.Module], Any]]:
        """The posterior variables as {name: fn(model)}, from ``record`` and the model."""
        if self._resolved is not None:
            return self._resolved
        spec = self.record_spec
        params = dict(model.named_parameters())
        if spec is None:
            size = sum(p.numel() for p in params.values())
            if size >= DEFAULT_RECORD_LIMIT:
                warnings.warn(
                    f"the model has {size:,} parameters: recording none of them by default (only sample_stats and "
                    "log_likelihood). Choose with record=['layer.weight', ...] (parameter names) or "
                    "record={'name': fn(model)} (e.g. predictions on an evaluation set)",
                    stacklevel=3,
                )
                spec = []
            else:
                spec = list(params)
        if isinstance(spec, Mapping):
            resolved = dict(spec)
        else:
            missing = [n for n in spec if n not in params]
            if missing:
                raise ValueError(f"record names {missing} are not parameters of the model; it has {list(params)}")
            resolved = {_check_name(n, "record"): (lambda m, n=n: dict(m.named_parameters())[n]) for n in spec}
        self._resolved = resolved
        return resolved

    def values(self, model: torch.nn.Module, sampler: Any) -> dict[str, dict[str, np.ndarray]]:
        """One draw: {group: {name: array}} for the model and ``sampler.stats`` now."""
        with torch.no_grad():
            posterior = {name: _to_numpy(fn(model), name) for name, fn in self.resolve(model).items()}
            loglik = {name: _to_numpy(fn(model), name) for name, fn in self.log_likelihood.items()}
        self._check_shapes({**posterior, **loglik})
        stats = {}
        for key, value in (getattr(sampler, "stats", None) or {}).items():
            if key == "diverging":
                stats[key] = np.asarray(bool(value))
            elif isinstance(value, (bool, int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                stats[key] = np.asarray(float(value), dtype=np.float64)
        return {"posterior": posterior, "sample_stats": stats, "log_likelihood": loglik}

    def _check_shapes(self, values: Mapping[str, np.ndarray]) -> None:
        """Every draw of a recorded function has the shape of its first draw."""
        for name, value in values.items():
            first = self._shapes.setdefault(name, value.shape)
            if value.shape != first:
                raise ValueError(f"the function recorded as {name!r} returned shape {value.shape} at this draw but "
                                 f"{first} at the first: a recorded value must keep its shape")

    # -- the in-memory recorder ---------------------------------------------------------------------

    def record(self, chain: int, model: torch.nn.Module, sampler: Any = None) -> None:
        """Append one draw of ``chain`` (an integer; chains may be recorded in any order)."""
        if isinstance(chain, bool) or not isinstance(chain, int) or chain < 0:
            raise ValueError(f"chain must be an integer >= 0, got {chain!r}")
        store = self._chains.setdefault(chain, {g: {} for g in GROUPS})
        for group, values in self.values(model, sampler).items():
            for name, value in values.items():
                column = store[group].setdefault(name, [])
                if column and column[0].shape != value.shape:
                    raise ValueError(f"{group}/{name} changed shape from {column[0].shape} to {value.shape}")
                column.append(value)
        if self.keep_params is not None:
            from .chains.params import ChainParams

            if chain not in self._params:
                self._params[chain] = ChainParams(self.directory, chain, self.keep_params)
            self._params[chain].offer(model)

    def save_ensemble(self) -> Path:
        """Writes ``ensemble.json`` for the parameter draws written so far (chains in increasing order); returns
        its path. `vr_mcmc.PosteriorEnsemble(directory, model)` reads it."""
        from .chains.params import write_index

        if self.keep_params is None:
            raise ValueError("this Recorder keeps no parameters: create it with keep_params=k, directory=DIR")
        chains = sorted(self._params)
        if not any(self._params[c].index for c in chains):
            raise ValueError(f"no parameter draw written yet: keep_params={self.keep_params} writes every "
                             f"{self.keep_params}-th draw recorded per chain")
        return write_index(self.directory, [self._params[c].index for c in chains], self.keep_params,
                           chain_ids=chains, source="vr_mcmc.Recorder")

    def to_arviz(self, **attrs: Any) -> Any:
        """The recorded draws as `az.InferenceData` (ArviZ 0.x) or `xarray.DataTree` (ArviZ 1.x).
        Chains are truncated to the shortest one (ArviZ needs equal lengths), with a warning."""
        if not self._chains:
            raise ValueError("nothing recorded yet: call recorder.record(chain, model, sampler) after each draw")
        chains = sorted(self._chains)
        lengths = {c: max((len(col) for g in GROUPS for col in self._chains[c][g].values()), default=0)
                   for c in chains}
        n = min(lengths.values())
        if len(set(lengths.values())) > 1:
            warnings.warn(f"chains have different numbers of draws {lengths}: keeping the first {n} of each",
                          stacklevel=2)
        groups = {}
        for group in GROUPS:
            names = self._chains[chains[0]][group]
            data = {name: np.stack([np.stack(self._chains[c][group][name][:n]) for c in chains]) for name in names}
            if data:
                groups[group] = dataset(data, chains)
        if self.observed_data:
            groups["observed_data"] = observed_dataset(self.observed_data)
        if self.keep_params is not None and any(p.index for p in self._params.values()):
            self.save_ensemble()
        return to_arviz(groups, **{**self.attrs, **attrs})


def dataset(data: Mapping[str, np.ndarray], chains: Sequence[int] | None = None) -> xr.Dataset:
    """{name: array [chain, draw, ...]} -> Dataset with dims (chain, draw, <name>_dim_k)."""
    variables = {}
    for name, value in data.items():
        dims = ("chain", "draw", *(f"{name}_dim_{i}" for i in range(value.ndim - 2)))
        variables[name] = (dims, value)
    ds = xr.Dataset(variables)
    first = next(iter(data.values()))
    coords = {"chain": np.asarray(list(chains) if chains is not None else range(first.shape[0])),
              "draw": np.arange(first.shape[1])}
    return ds.assign_coords(coords)


def observed_dataset(observed: Mapping[str, np.ndarray]) -> xr.Dataset:
    """{name: array} -> the observed_data Dataset, dims ``<name>_dim_k``."""
    return xr.Dataset({k: (tuple(f"{k}_dim_{i}" for i in range(v.ndim)), v) for k, v in observed.items()})


def arviz_major() -> int:
    """The installed ArviZ's major version (0: InferenceData; 1: xarray.DataTree)."""
    import arviz

    return int(arviz.__version__.split(".")[0])


def run_attrs(**attrs: Any) -> dict[str, Any]:
    """The attributes ArviZ writes on each group (``created_at``, ``inference_library``, its
    version) and ``attrs`` (None and NaN dropped: netCDF has no None)."""
    from . import __version__

    base = {"created_at": datetime.now(timezone.utc).isoformat(), "inference_library": "vr_mcmc",
            "inference_library_version": __version__}
    base.update({k: v for k, v in attrs.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})
    return base


def to_arviz(groups: Mapping[str, xr.Dataset], **attrs: Any) -> Any:
    """Datasets per group -> `az.InferenceData` (ArviZ 0.x) or `xarray.DataTree` (ArviZ 1.x), with
    `run_attrs` on every group but observed_data (which gets only created_at, inference_library)."""
    base = run_attrs(**attrs)
    for name, ds in groups.items():
        ds.attrs.update(base if name != "observed_data" else {k: base[k] for k in ("created_at", "inference_library")})
    if arviz_major() >= 1:
        return xr.DataTree.from_dict(dict(groups))
    import arviz

    return arviz.InferenceData(**groups)
