"""The chain manager: `sample` runs chains of any torch_sample sampler and returns ArviZ data (DESIGN.md §7).

After NumPyro's ``MCMC``: per chain, ``torch.manual_seed(seed + chain)``, a fresh model from
``model_fn()`` and its sampler from ``sampler_fn(model)``; ``num_warmup`` steps (with adaptation
for MALA/HMC), then ``num_samples`` steps keeping every ``thin``-th (``num_samples // thin`` draws,
as NumPyro and Stan thin). Minibatch samplers get
uniform batches of indices (a fresh seeded permutation each epoch); closure samplers (ULA, MALA,
HMC) a full-data closure.

With ``checkpoint=DIR`` draws go to disk as they are made (a small netCDF file per block of
``checkpoint_every`` draws, so memory holds one block; at the end they are merged into
``DIR/results.nc``, read lazily), and with every block the model, the
sampler (estimator tables, adaptation, generator), the global RNG and the batch stream are saved.
Calling `sample` again with the same arguments and directory after a crash resumes each chain from
its last checkpoint and gives the draws an uninterrupted run gives; a finished run is just read back.
A directory holding another run, or a damaged checkpoint, is refused and left as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .recorder import GROUPS, Recorder, arviz_major, dataset, observed_dataset, run_attrs, to_arviz

__all__ = ["CheckpointError", "sample"]

RESULTS_FILE = "results.nc"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed: another run's, or damaged."""


# -- batches ----------------------------------------------------------------------------------------


class _IndexStream:
    """Batches of ``batch_size`` indices from a seeded permutation per epoch (the last batch of an
    epoch may be smaller); its state is (epoch, position), so it resumes exactly."""

    def __init__(self, num_data: int, batch_size: int, seed: int):
        self.num_data, self.batch_size, self.seed = num_data, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_data, generator=gen)
        return self._order

    def next(self) -> torch.Tensor:
        if self.position >= self.num_data:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        batch = self._permutation()[self.position : self.position + self.batch_size]
        self.position += batch.numel()
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def _as_data(data: Any) -> tuple[int, Callable[[torch.Tensor], tuple]]:
    """(N, fetch(indices) -> batch tuple) for a tuple of tensors or a map-style dataset."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        sizes = {t.shape[0] for t in data}
        if len(sizes) != 1:
            raise ValueError(f"the data tensors must share their first (example) dimension, got sizes {sorted(sizes)}")
        return sizes.pop(), lambda idx: tuple(t[idx.to(t.device)] for t in data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        from torch.utils.data import default_collate

        def fetch(idx: torch.Tensor) -> tuple:
            batch = default_collate([data[i] for i in idx.tolist()])
            return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)

        return len(data), fetch
    raise TypeError("data must be a tensor, a tuple of tensors (X, y, ...) or a map-style Dataset")


# -- per-chain draw files ------------------------------------------------------------------------------


def _write_block(path: Path, block: dict[str, dict[str, list[np.ndarray]]]) -> None:
    """One block of a chain's draws as a small netCDF file (groups of variables over ``draw``),
    written under a temporary name and renamed, so a crash never leaves half a block."""
    import h5netcdf

    tmp = path.with_suffix(".tmp")
    with h5netcdf.File(tmp, "w") as f:
        for group, columns in block.items():
            if not columns:
                continue
            g = f.create_group(group)
            for name, values in columns.items():
                arr = np.stack(values)
                dims = ("draw", *(f"{name}_dim_{i}" for i in range(arr.ndim - 1)))
                for d, size in zip(dims, arr.shape):
                    if d not in g.dimensions:
                        g.dimensions[d] = size
                var = g.create_variable(name, dims, data=arr.astype(np.int8) if arr.dtype == np.bool_ else arr)
                if arr.dtype == np.bool_:
                    var.attrs["dtype"] = "bool"  # xarray's encoding of booleans in netCDF
    os.replace(tmp, path)


class _ChainBlocks:
    """The block files of one chain: ``[warmup_]chain_<c>.<k>.nc``, k = 0, 1, ..."""

    def __init__(self, directory: Path, chain: int, warmup: bool = False):
        self.directory, self.stem = directory, f"{'warmup_' if warmup else ''}chain_{chain}"

    def path(self, index: int) -> Path:
        return self.directory / f"{self.stem}.{index:06d}.nc"

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.stem}.[0-9]*.nc"))

    def drop_from(self, index: int) -> None:
        """Deletes blocks ``index`` and later: draws made after the last checkpoint, made again."""
        for p in self.paths():
            if int(p.name.split(".")[-2]) >= index:
                p.unlink()


def _block_length(path: Path, group: str) -> int:
    """Draws in one block file (its ``draw`` dimension), without reading the data."""
    import h5netcdf

    with h5netcdf.File(path, "r") as f:
        return f.groups[group].dimensions["draw"].size if group in f.groups else 0


def _read_group(path: Path, group: str) -> dict[str, np.ndarray]:
    import h5netcdf

    out = {}
    with h5netcdf.File(path, "r") as f:
        if group in f.groups:
            for name, var in f.groups[group].variables.items():
                if name in f.groups[group].dimensions:
                    continue
                value = var[...]
                out[name] = value.astype(bool) if var.attrs.get("dtype") == "bool" else value
    return out


def _merge(directory: Path, num_chains: int, out: Path, attrs: dict[str, Any],
           observed_data: Mapping[str, np.ndarray]) -> None:
    """The chains' block files -> one netCDF file with groups over (chain, draw, ...), one block in memory."""
    import h5netcdf

    tmp = out.with_suffix(".partial")
    with h5netcdf.File(tmp, "w") as dst:
        for warmup in (False, True):
            chains = [_ChainBlocks(directory, c, warmup).paths() for c in range(num_chains)]
            if not all(chains):
                continue
            for group in GROUPS:
                first = _read_group(chains[0][0], group)
                if not first:
                    continue
                lengths = [sum(_block_length(p, group) for p in paths) for paths in chains]
                n = min(lengths)
                g = dst.create_group(("warmup_" if warmup else "") + group)
                g.dimensions["chain"] = num_chains
                g.dimensions["draw"] = n
                g.create_variable("chain", ("chain",), data=np.arange(num_chains))
                g.create_variable("draw", ("draw",), data=np.arange(n))
                variables = {}
                for name, value in first.items():
                    dims = ("chain", "draw", *(f"{name}_dim_{i}" for i in range(value.ndim - 1)))
                    for d, size in zip(dims[2:], value.shape[1:]):
                        g.dimensions[d] = size
                    dtype = np.int8 if value.dtype == np.bool_ else value.dtype
                    chunks = (1, max(1, min(n, 2**20 // max(1, value[0].size))), *value.shape[1:])
                    variables[name] = g.create_variable(name, dims, dtype=dtype, chunks=chunks)
                    if value.dtype == np.bool_:
                        variables[name].attrs["dtype"] = "bool"
                for c, paths in enumerate(chains):
                    start = 0
                    for p in paths:
                        block = _read_group(p, group)
                        size = min(len(next(iter(block.values()))), n - start)
                        for name, value in block.items():
                            variables[name][c, start : start + size] = value[:size]
                        start += size
                g.attrs.update(attrs)
        if observed_data:
            g = dst.create_group("observed_data")
            for name, value in observed_data.items():
                dims = tuple(f"{name}_dim_{i}" for i in range(value.ndim))
                for d, size in zip(dims, value.shape):
                    g.dimensions[d] = size
                g.create_variable(name, dims, data=value)
            g.attrs.update({k: attrs[k] for k in ("created_at", "inference_library") if k in attrs})
    os.replace(tmp, out)


# -- one chain ----------------------------------------------------------------------------------------


def _is_closure_sampler(sampler: Any) -> bool:
    from torch_sample.metropolis import MetropolisSampler

    return isinstance(sampler, MetropolisSampler)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"the checkpoint {path} cannot be read ({type(exc).__name__}: {exc}). The draws already written are "
            f"untouched; to restart this chain from its beginning, delete {path} and the chain's .nc files"
        ) from exc


def _run_chain(spec: dict[str, Any], chain: int) -> dict[str, Any]:
    """Runs (or resumes) one chain, writing its draws to ``spec['directory']``; returns its summary."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    directory = Path(spec["directory"])
    ckpt_path = directory / f"chain_{chain}.pt"
    files = {"warmup": _ChainBlocks(directory, chain, warmup=True), "draws": _ChainBlocks(directory, chain)}
    torch.manual_seed(spec["seed"] + chain)
    model = spec["model_fn"]()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fn() must return a torch.nn.Module, got {type(model).__name__}")
    sampler = spec["sampler_fn"](model)
    if not isinstance(sampler, torch.optim.Optimizer):
        raise TypeError(f"sampler_fn(model) must return a torch_sample sampler, got {type(sampler).__name__}")
    recorder = Recorder(spec["record"], spec["log_likelihood"])
    num_data, fetch = _as_data(spec["data"])
    stream = _IndexStream(num_data, spec["batch_size"], spec["seed"] * 7919 + chain)
    closure_sampler = _is_closure_sampler(sampler)
    num_warmup, thin = spec["num_warmup"], spec["thin"]
    adapting = closure_sampler and num_warmup > 0 and sampler.adapts_step_size  # ULA has no acceptance to adapt to
    total = num_warmup + spec["num_samples"]
    loss_fn = spec["loss_fn"]
    step, blocks = 0, {"warmup": 0, "draws": 0}
    elapsed = 0.0

    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        stream.load_state_dict(state["stream"])
        step, blocks, elapsed = state["step"], state["blocks"], state.get("elapsed", 0.0)
    for kind in ("warmup", "draws"):
        files[kind].drop_from(blocks[kind])
    if step == 0 and adapting:
        sampler.adapt(True, num_warmup=num_warmup)

    full_batch = fetch(torch.arange(num_data)) if closure_sampler else None

    def full_closure() -> torch.Tensor:
        sampler.zero_grad()
        loss = loss_fn(model, full_batch)
        loss.backward()
        return loss

    buffers: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {"warmup": {}, "draws": {}}
    every = spec["checkpoint_every"]
    bar = _progress(spec, chain, total, step)
    start_time = time.perf_counter()

    def flush_and_checkpoint() -> None:
        for kind in ("warmup", "draws"):
            if buffers[kind]:
                _write_block(files[kind].path(blocks[kind]), buffers[kind])
                blocks[kind] += 1
                buffers[kind] = {}
        if spec["persistent"]:
            _save_atomic({"step": step, "blocks": dict(blocks), "model": model.state_dict(),
                          "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                          "stream": stream.state_dict(), "elapsed": elapsed + time.perf_counter() - start_time},
                         ckpt_path)

    try:
        while step < total:
            if closure_sampler:
                sampler.step(full_closure)
            else:
                idx = stream.next()
                batch = fetch(idx)

                def closure(batch=batch):  # as torch.optim.LBFGS's: zero, loss, backward
                    sampler.zero_grad()
                    out = loss_fn(model, batch)
                    if not isinstance(out, torch.Tensor) or out.numel() != 1:
                        raise TypeError("loss_fn(model, batch) must return the batch mean NLL as a one-element tensor")
                    out.backward()
                    return out

                if getattr(getattr(sampler, "estimator", None), "needs_closure", False):
                    sampler.step(closure, indices=idx)  # it calls the closure at θ, and again at its centre
                else:
                    loss = closure()
                    sampler.step(indices=idx, loss=loss.detach())
            step += 1
            if adapting and step == num_warmup:
                sampler.adapt(False)
            in_warmup = step <= num_warmup
            kept = (step - (0 if in_warmup else num_warmup)) % thin == 0
            if kept and (not in_warmup or spec["save_warmup"]):
                kind = "warmup" if in_warmup else "draws"
                for group, values in recorder.values(model, sampler).items():
                    for name, value in values.items():
                        buffers[kind].setdefault(group, {}).setdefault(name, []).append(value)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix_str(_postfix(sampler.stats), refresh=False)
            if step % (every * thin) == 0 or step == total or (step == num_warmup and num_warmup > 0):
                flush_and_checkpoint()
    finally:
        if bar is not None:
            bar.close()
    return {"chain": chain, "elapsed": elapsed + time.perf_counter() - start_time}


def _postfix(stats: Mapping[str, float]) -> str:
    if "acceptance_rate" in stats:
        return f"accept {stats['acceptance_rate']:.2f} step {stats.get('step_size', float('nan')):.3g}"
    return f"step {stats.get('step_size', float('nan')):.3g}"


def _progress(spec: dict[str, Any], chain: int, total: int, done: int) -> Any:
    if not spec["progress"] or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, initial=done, desc=f"chain {chain}", position=chain if spec["parallel"] else 0,
                leave=True, dynamic_ncols=True)


# -- the run ------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _manifest(spec: dict[str, Any]) -> dict[str, Any]:
    record = spec["record"]
    return {
        "format": 1,
        "num_chains": spec["num_chains"], "num_warmup": spec["num_warmup"], "num_samples": spec["num_samples"],
        "thin": spec["thin"], "seed": spec["seed"], "batch_size": spec["batch_size"],
        "save_warmup": spec["save_warmup"], "checkpoint_every": spec["checkpoint_every"],
        "record": None if record is None else sorted(record) if isinstance(record, Mapping) else list(record),
        "log_likelihood": sorted(Recorder(None, spec["log_likelihood"]).log_likelihood),
    }


def _prepare_directory(directory: Path, manifest: dict[str, Any]) -> bool:
    """Creates or checks the checkpoint directory; True if it holds a finished run."""
    path = directory / MANIFEST_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is damaged ({exc}); nothing was changed. Use a new checkpoint directory, "
                                  "or restore the file") from exc
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"the checkpoint directory {directory} holds another run ({listed}); nothing was "
                                  "changed. Call with the same arguments to resume it, or give a new directory")
        return (directory / RESULTS_FILE).exists()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"the checkpoint directory {directory} is not empty and holds no {MANIFEST_FILE}: it is "
                              "not a vr_mcmc run; nothing was changed. Give a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return False


def _open_results(path: Path) -> Any:
    """The merged results, opened lazily, as `to_arviz` would return them."""
    import arviz
    import xarray as xr

    if arviz_major() >= 1:
        return xr.open_datatree(path, engine="h5netcdf")
    return arviz.from_netcdf(path)


def sample(
    model_fn: Callable[[], torch.nn.Module],
    sampler_fn: Callable[[torch.nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.nn.Module, tuple], torch.Tensor],
    data: Any,
    *,
    batch_size: int,
    num_warmup: int,
    num_samples: int,
    num_chains: int = 4,
    thin: int = 1,
    record: Sequence[str] | Mapping[str, Callable] | None = None,
    log_likelihood: Callable | Mapping[str, Callable] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    seed: int = 0,
    chain_method: str = "sequential",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    save_warmup: bool = False,
) -> Any:
    """Run ``num_chains`` chains and return their draws as ArviZ data (see the module docstring).

    ``model_fn()`` -> a fresh model (seeded per chain by ``torch.manual_seed(seed + chain)``);
    ``sampler_fn(model)`` -> its sampler (a torch_sample sampler whose ``num_data`` is N);
    ``loss_fn(model, batch)`` -> the batch mean NLL, ``batch`` = the data's tensors at a batch of
    indices (a tuple). ``batch_size`` is used by minibatch samplers (closure samplers see all data).
    ``num_warmup`` steps adapt (MALA/HMC) and are dropped (kept in ``warmup_*`` with ``save_warmup``);
    ``num_samples`` counts the steps after warmup, of which every ``thin``-th is kept, as NumPyro and
    Stan do: ``num_samples=1000, thin=2`` gives 500 draws per chain.
    ``record``/``log_likelihood``/``observed_data``: as `Recorder`. ``chain_method="parallel"`` runs
    each chain in its own process (spawn; one torch thread each; the functions must be picklable,
    i.e. defined at module level) and gives the draws of ``"sequential"``. ``checkpoint``: a
    directory for the draws and the resumable state, saved every ``checkpoint_every`` draws.

    Returns `az.InferenceData` on ArviZ 0.x, `xarray.DataTree` on ArviZ 1.x, with groups posterior,
    sample_stats, log_likelihood, observed_data (and warmup_* with ``save_warmup=True``).
    """
    _check_int("num_chains", num_chains, 1)
    _check_int("num_warmup", num_warmup, 0)
    _check_int("num_samples", num_samples, 1)
    _check_int("thin", thin, 1)
    if thin > num_samples:
        raise ValueError(f"thin={thin} keeps every {thin}-th of the num_samples={num_samples} steps after warmup, "
                         "so no draw: num_samples counts steps (as in NumPyro), e.g. num_samples=draws * thin")
    _check_int("batch_size", batch_size, 1)
    _check_int("checkpoint_every", checkpoint_every, 1)
    _check_int("seed", seed, 0)
    if chain_method not in ("sequential", "parallel"):
        raise ValueError(f"chain_method must be 'sequential' or 'parallel', got {chain_method!r}")
    for name, fn in (("model_fn", model_fn), ("sampler_fn", sampler_fn), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    num_data, _ = _as_data(data)
    if batch_size > num_data:
        raise ValueError(f"batch_size {batch_size} is larger than the data ({num_data} examples)")
    Recorder(record, log_likelihood, observed_data)  # checks the arguments before any work
    observed = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for k, v in (observed_data or {}).items()}

    persistent = checkpoint is not None
    tmp_dir = None if persistent else tempfile.mkdtemp(prefix="vr_mcmc_")
    directory = Path(checkpoint) if persistent else Path(tmp_dir)
    spec = dict(model_fn=model_fn, sampler_fn=sampler_fn, loss_fn=loss_fn, data=data, batch_size=batch_size,
                num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples, thin=thin, record=record,
                log_likelihood=log_likelihood, seed=seed, save_warmup=save_warmup, directory=str(directory),
                checkpoint_every=checkpoint_every, progress=progress, persistent=persistent,
                parallel=chain_method == "parallel", threads=1 if chain_method == "parallel" else None)
    try:
        finished = _prepare_directory(directory, _manifest(spec)) if persistent else False
        if not finished:
            start = time.perf_counter()
            if chain_method == "parallel":
                summaries = _run_parallel(spec)
            else:
                with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
                    summaries = [_run_chain(spec, c) for c in range(num_chains)]
            wall = time.perf_counter() - start
            # a resumed run counts the time of its earlier parts too (saved with each checkpoint)
            sampling_time = float(sum(s["elapsed"] for s in summaries)) if persistent else wall
            attrs = {"sampling_time": sampling_time, "tuning_steps": num_warmup, "num_chains": num_chains,
                     "thin": thin, "chain_method": chain_method}
            if not persistent:
                return _in_memory(directory, num_chains, attrs, observed)
            _merge(directory, num_chains, directory / RESULTS_FILE, run_attrs(**attrs), observed)
            for chain in range(num_chains):  # merged: the blocks would only double the disk used
                for warmup in (False, True):
                    _ChainBlocks(directory, chain, warmup).drop_from(0)
        return _open_results(directory / RESULTS_FILE)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _in_memory(directory: Path, num_chains: int, attrs: dict[str, Any], observed: Mapping[str, np.ndarray]) -> Any:
    """Reads the chains' blocks into memory (a run without ``checkpoint``) and builds the ArviZ object."""

    groups = {}
    for warmup in (False, True):
        chains = [_ChainBlocks(directory, c, warmup).paths() for c in range(num_chains)]
        if not all(chains):
            continue
        for group in GROUPS:
            columns: dict[str, list[np.ndarray]] = {}
            for paths in chains:
                parts = [_read_group(p, group) for p in paths]
                for name in parts[0]:
                    columns.setdefault(name, []).append(np.concatenate([part[name] for part in parts]))
            if columns:
                n = min(len(a) for v in columns.values() for a in v)
                groups[("warmup_" if warmup else "") + group] = dataset(
                    {k: np.stack([a[:n] for a in v]) for k, v in columns.items()})
    if observed:
        groups["observed_data"] = observed_dataset(observed)
    return to_arviz(groups, **attrs)


def _run_parallel(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=min(spec["num_chains"], os.cpu_count() or 1)) as pool:
        results = [pool.apply_async(_run_chain, (spec, c)) for c in range(spec["num_chains"])]
        return [r.get() for r in results]
