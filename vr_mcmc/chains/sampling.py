"""The public `sample`: checks the arguments, runs the chains (sequential or parallel), returns ArviZ data."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..recorder import Recorder, run_attrs
from .blocks import ChainBlocks, in_memory, merge
from .checkpoint import RESULTS_FILE, file_entry, manifest, open_results, prepare_directory, write_manifest
from .loader import data_size
from .parallel import check_main_guard, run_parallel
from .params import check_keep_params, repair_index, write_index
from .preflight import preflight
from .runner import run_chain
from .vectorized import run_vectorized

__all__ = ["SMALL_MODEL", "sample"]

# Models with fewer parameters than this run sequential chains on one torch thread by default (num_threads=None):
# per-step work is too small to split, and a second thread only waits for a core. Measured on a 2-core CPU
# shared with other jobs (`python benchmarks/threads.py`, SAGA-LD): MLP 64-32-10, B=32: 2.5 ms a step on one
# thread, 11.4 ms on two; MLP 784-512-512-10 (670k parameters), B=128: 35 ms vs 287 ms.
SMALL_MODEL = 1_000_000
CHAIN_METHODS = ("sequential", "parallel", "vectorized")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def sample(
    model_fn: Callable[[], torch.nn.Module],
    sampler_fn: Callable[[torch.nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.nn.Module, tuple], torch.Tensor],
    data: Any,
    *,
    batch_size: int | None = None,
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
    num_threads: int | None = None,
    max_vectorized: int | None = None,
    vectorized_compile: bool | None = None,
    keep_params: int | None = None,
    data_parallel: bool = False,
    process_group: Any = None,
) -> Any:
    """Run ``num_chains`` chains and return their draws as ArviZ data (see `vr_mcmc.chains`).

    ``model_fn()`` -> a fresh model (seeded per chain by ``torch.manual_seed(chain_seeds(seed, chain)[0])``);
    ``sampler_fn(model)`` -> its sampler (a torch_sample sampler whose ``num_data`` is N);
    ``loss_fn(model, batch)`` -> the batch mean NLL, ``batch`` = the data's tensors at a batch of
    indices (a tuple). ``batch_size`` is used by minibatch samplers (closure samplers see all data).
    ``data``: a tensor or tuple of tensors (X, y, ...) with examples in dim 0, a map-style dataset, or a
    ``DataLoader`` over a `vr_mcmc.data.IndexedDataset` (any iterable of ``(idx, *batch)``; ``batch_size`` is
    then the loader's, and ``loss_fn`` gets ``batch[1:]``): workers, pinned memory and augmentation work, and
    chains stay reproducible and resumable (`vr_mcmc.chains.loader` says how).
    ``num_warmup`` steps adapt (MALA/HMC) and are dropped (kept in ``warmup_*`` with ``save_warmup``);
    ``num_samples`` counts the steps after warmup, of which every ``thin``-th is kept, as NumPyro and
    Stan do: ``num_samples=1000, thin=2`` gives 500 draws per chain.
    ``record``/``log_likelihood``/``observed_data``: as `Recorder`. ``chain_method="parallel"`` runs
    each chain in its own process (spawn; one torch thread each; the functions must be picklable,
    i.e. defined at module level) and gives the draws of ``"sequential"``. ``checkpoint``: a
    directory for the draws and the resumable state, saved every ``checkpoint_every`` draws.
    ``chain_method="vectorized"`` runs the chains as one batched computation (DESIGN.md §13,
    `vr_mcmc.chains.vectorized`): the chains' parameters stacked with a leading chain dimension, ``loss_fn`` under
    ``torch.vmap`` of ``torch.func.functional_call``, per-example gradients for SAGA-LD's table from the same
    batched pass; every sampler (the SG family, SAGA-LD/SVRG-LD/SGLD-CV, ULA/MALA/HMC/NUTS with per-chain adaptation
    and trees). SGLD, SAGA-LD, SGHMC, pSGLD and SGNHT (minibatch or SAGA estimates, noise diagnostic included)
    update all chains (and SAGA's tables, stacked) in one step; SVRG-LD/SGLD-CV and the closure samplers step per
    chain, their closures evaluated for all chains at once. Chain c is sequential chain c with the same
    seed (same init, batches and noise) up to float rounding of the batched sums, with the same output and
    checkpoint files (a sequential checkpoint resumes vectorized; not for SAGA-LD on a model with parameters outside
    Linear layers, whose table rows the vectorized pass computes dense where the engine stores factors). The model
    and loss must be vmappable (no data-dependent Python control flow, no in-place update of a tensor that is not a
    buffer, no random operations such as dropout in training mode): otherwise a `VectorizeError` before any draw
    names the cause. ``max_vectorized=k``: at most k chains per batched computation (groups run one after another).
    ``vectorized_compile``: run the batched computations through ``torch.compile`` (compiled once per group, for
    the run's batch size; a failing compilation warns and runs eager); None (default) compiles for runs of at least
    5000 steps per chain (500 for ULA/MALA/HMC/NUTS, whose steps make full-data evaluations), where the
    compilation's seconds are repaid (`vr_mcmc.chains.vectorized.COMPILE_MIN_STEPS`; benchmarks/RESULTS.md).
    ``num_threads``: torch intra-op threads while the chains run (the caller's setting is restored after);
    None chooses: one for models under `SMALL_MODEL` (1M) parameters, where a second thread only slows a
    step down (5–8× measured on a busy 2-core machine), torch's setting otherwise; one per worker with
    ``chain_method="parallel"``.
    ``keep_params=k`` (needs ``checkpoint``): every k-th draw's state dict (parameters and buffers) is saved
    as a safetensors file in ``checkpoint/params/``, crash-safe and resumed as the draws are; read the
    ensemble with `vr_mcmc.PosteriorEnsemble(checkpoint, model)` (see `vr_mcmc.chains.params`).

    Under ``torchrun`` (or with a torch.distributed group initialized, or the group ``process_group=``) the chains
    are spread over the ranks (each as in one process: the same result), or with ``data_parallel=True`` each chain
    runs across all ranks, each rank on its shard of the examples and of the SAGA table, the estimate all-reduced
    (the one-process chain up to the order of sums): see `vr_mcmc.distributed`. Rank 0 returns the merged result,
    the other ranks None. ``process_group=False``: each rank runs its own `sample`, as without torch.distributed.

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
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    _check_int("checkpoint_every", checkpoint_every, 1)
    _check_int("seed", seed, 0)
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    check_keep_params(keep_params, checkpoint, num_samples // thin)
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
    if max_vectorized is not None:
        _check_int("max_vectorized", max_vectorized, 1)
        if chain_method != "vectorized":
            raise ValueError(f"max_vectorized={max_vectorized} caps the chains of chain_method='vectorized'; "
                             f"this run's chain_method is {chain_method!r}")
    if vectorized_compile is not None:
        if not isinstance(vectorized_compile, bool):
            raise TypeError(f"vectorized_compile must be True, False or None, got {vectorized_compile!r}")
        if chain_method != "vectorized":
            raise ValueError(f"vectorized_compile={vectorized_compile} is an option of chain_method='vectorized'; "
                             f"this run's chain_method is {chain_method!r}")
    if chain_method == "vectorized" and (process_group is not None or data_parallel):
        raise ValueError("chain_method='vectorized' runs on one process: it does not combine with process_group= or "
                         "data_parallel=True (torch.distributed); use chain_method='sequential' across ranks")
    if chain_method == "parallel" and not process_group and not data_parallel:
        check_main_guard()
    for name, fn in (("model_fn", model_fn), ("sampler_fn", sampler_fn), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    num_data = data_size(data)  # None: an iterable of unknown length (N is the sampler's num_data)
    if batch_size is not None and num_data is not None and batch_size > num_data:
        raise ValueError(f"batch_size {batch_size} is larger than the data ({num_data} examples)")
    Recorder(record, log_likelihood, observed_data)  # checks the arguments before any work
    observed = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                for k, v in (observed_data or {}).items()}

    persistent = checkpoint is not None
    spec = dict(model_fn=model_fn, sampler_fn=sampler_fn, loss_fn=loss_fn, data=data, batch_size=batch_size,
                num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples, thin=thin, record=record,
                log_likelihood=log_likelihood, seed=seed, save_warmup=save_warmup, directory=None,
                checkpoint_every=checkpoint_every, progress=progress, persistent=persistent,
                parallel=chain_method == "parallel", threads=num_threads,
                keep_params=keep_params, vectorized=chain_method == "vectorized", max_vectorized=max_vectorized,
                vectorized_compile=vectorized_compile)
    from ..distributed.group import resolve

    comm = resolve(process_group, bool(data_parallel))
    if comm is not None:  # several ranks (vr_mcmc.distributed)
        from ..distributed.driver import run_distributed

        return run_distributed(spec, checkpoint, observed, comm, bool(data_parallel), chain_method, num_data)
    tmp_dir = None if persistent else tempfile.mkdtemp(prefix="vr_mcmc_")
    directory = Path(checkpoint) if persistent else Path(tmp_dir)
    spec["directory"] = str(directory)
    try:
        fingerprint = preflight(spec, num_data, observed)
        if spec["threads"] is None:
            spec["threads"] = default_threads(fingerprint, spec["parallel"])
        content, finished = prepare_directory(directory, manifest(spec, fingerprint)) if persistent else ({}, False)
        if finished and keep_params:
            repair_index(directory, num_chains, keep_params)  # a lost ensemble.json comes back from the checkpoints
        if not finished:
            start = time.perf_counter()
            try:
                summaries = _run_chains(spec)
            except (Exception, KeyboardInterrupt) as exc:
                _attach_partial(exc, spec, observed, time.perf_counter() - start)
                raise
            wall = time.perf_counter() - start
            # a resumed run counts the time of its earlier parts too (saved with each checkpoint)
            sampling_time = float(sum(s["elapsed"] for s in summaries)) if persistent else wall
            attrs = {"sampling_time": sampling_time, "tuning_steps": num_warmup, "num_chains": num_chains,
                     "thin": thin, "chain_method": chain_method}
            if not persistent:
                return in_memory(directory, num_chains, attrs, observed)
            _finish(directory, content, summaries, run_attrs(**attrs, run_id=content["run_id"]), observed,
                    keep_params)
        return open_results(directory / RESULTS_FILE)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _finish(directory: Path, content: dict[str, Any], summaries: list[dict[str, Any]], attrs: dict[str, Any],
            observed: Mapping[str, np.ndarray], keep_params: int | None = None) -> None:
    """Merges the verified blocks into results.nc, checks it, writes the parameter draws' ensemble.json (with
    ``keep_params``), records results.nc's checksum and the blocks in the manifest, and only then removes the
    blocks (they would only double the disk used)."""
    summaries = sorted(summaries, key=lambda s: s["chain"])
    indexes = [s["index"] for s in summaries]
    merge(directory, indexes, directory / RESULTS_FILE, attrs, observed)
    if keep_params:
        write_index(directory, [s["params"] for s in summaries], keep_params)
    write_manifest(directory, {**content, "blocks": indexes, "results": file_entry(directory / RESULTS_FILE)})
    for chain in range(len(indexes)):
        for warmup in (False, True):
            ChainBlocks(directory, chain, warmup).drop_from(0)


def default_threads(fingerprint: Mapping[str, Any], parallel: bool) -> int | None:
    """num_threads=None: one thread per worker process, or for a model under `SMALL_MODEL` parameters; else
    None (torch's own setting)."""
    size = sum(math.prod(shape[:-1]) for name, shape in fingerprint["model"].items() if name.startswith("param:"))
    return 1 if parallel or size < SMALL_MODEL else None


def _run_chains(spec: dict[str, Any]) -> list[dict[str, Any]]:
    if spec["parallel"]:
        return run_parallel(spec)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            if spec.get("vectorized"):
                if spec.get("threads"):
                    torch.set_num_threads(spec["threads"])
                return run_vectorized(spec)
            return [run_chain(spec, c) for c in range(spec["num_chains"])]
    finally:
        torch.set_num_threads(threads)  # run_chain sets spec["threads"]: the caller's setting comes back


def _method(spec: dict[str, Any]) -> str:
    return "parallel" if spec["parallel"] else "vectorized" if spec.get("vectorized") else "sequential"


def _attach_partial(exc: BaseException, spec: dict[str, Any], observed: Mapping[str, np.ndarray],
                    wall: float) -> None:
    """Attaches the draws made before ``exc`` to it: ``exc.partial`` (ArviZ data of the chains with
    draws, shorter chains padded with NaN; None if none or unreadable) and ``exc.checkpoint`` (the
    checkpoint directory, where a call with the same arguments resumes; None without ``checkpoint=``)."""
    directory = Path(spec["directory"])
    attrs = {"sampling_time": wall, "tuning_steps": spec["num_warmup"], "num_chains": spec["num_chains"],
             "thin": spec["thin"], "chain_method": _method(spec)}
    drawn = any(ChainBlocks(directory, c, w).paths() for c in range(spec["num_chains"]) for w in (False, True))
    try:
        partial = in_memory(directory, spec["num_chains"], attrs, observed, partial=True) if drawn else None
    except Exception:  # unreadable blocks (a full disk, say): in a checkpoint directory they are resumed from
        partial = None
    try:
        exc.partial = partial
        exc.checkpoint = str(directory) if spec["persistent"] else None
    except AttributeError:  # an exception type that takes no attributes
        return
    if hasattr(exc, "add_note"):
        where = f"; resume it with the same call (checkpoint={str(directory)!r})" if spec["persistent"] else ""
        exc.add_note(f"vr_mcmc.sample: the draws made before this error are attached as the exception's "
                     f".partial (ArviZ data){where}")
