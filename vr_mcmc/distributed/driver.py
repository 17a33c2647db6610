"""`vr_mcmc.sample` on several ranks: the checks all ranks agree on, the checkpoint directory, the chains (spread
over the ranks, or each one data parallel), and the merge on rank 0."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chains.blocks import in_memory
from ..chains.checkpoint import RESULTS_FILE, _flatten, manifest, open_results, prepare_directory, sha256
from ..chains.loader import is_iterable_data
from ..chains.preflight import preflight
from ..chains.runner import build, run_chain
from ..recorder import run_attrs
from .group import Comm, DistributedError, check_backend
from .liveness import Heartbeat
from .sharding import Shard, chain_share, shard_range

__all__ = ["run_distributed"]


def run_distributed(spec: dict[str, Any], checkpoint: Any, observed: Mapping[str, np.ndarray], comm: Comm,
                    data_parallel: bool, chain_method: str, num_data: int) -> Any:
    """What `vr_mcmc.sample` returns on this rank: the merged ArviZ data on rank 0, None on the others."""
    from ..chains import sampling
    from ..chains.params import repair_index

    wanted = _agree(spec, observed, comm, data_parallel, chain_method, num_data)
    if spec["threads"] is None:
        spec["threads"] = sampling.default_threads(wanted, False)
    persistent = checkpoint is not None
    tmp_dir = None
    try:
        if persistent:
            directory = Path(checkpoint)
            setup = _rank0(comm, lambda: prepare_directory(directory, wanted), "preparing the checkpoint directory")
            content, finished = setup
            if finished:
                if comm.rank == 0 and spec.get("keep_params"):
                    repair_index(directory, spec["num_chains"], spec["keep_params"])  # a lost ensemble.json
                return open_results(directory / RESULTS_FILE) if comm.rank == 0 else None
        else:
            tmp_dir = tempfile.mkdtemp(prefix=f"vr_mcmc_rank{comm.rank}_")
            directory, content = Path(tmp_dir), {}
        token = comm.broadcast_object(uuid.uuid4().hex, "sharing the run's token")
        shared = _shared(directory, comm, token)
        if spec.get("keep_params") and (data_parallel or not shared):  # the same answer on every rank
            where = "with data_parallel=True" if data_parallel else "with a checkpoint directory the ranks do not share"
            raise ValueError(f"keep_params is not supported {where}: the parameter files are written by the rank "
                             "that runs the chain into the checkpoint directory. Run the chains across ranks "
                             "(data_parallel=False) with checkpoint= on a file system every rank sees (NFS, a shared "
                             "disk), or keep the parameters in a one-process run")
        spec = {**spec, "directory": str(directory), "persistent": persistent,
                "progress": spec["progress"] and (comm.rank == 0 or not data_parallel)}
        start = time.perf_counter()
        run = _data_parallel if data_parallel else _chains
        try:
            summaries = run(spec, comm, token, directory, shared)
        except (Exception, KeyboardInterrupt) as exc:  # the draws this rank sees go with the error, as in one process
            if comm.rank == 0 or not data_parallel:
                sampling._attach_partial(exc, spec, observed, time.perf_counter() - start)
            raise
        if comm.rank != 0:
            return None
        wall = time.perf_counter() - start
        sampling_time = float(sum(s["elapsed"] for s in summaries)) if persistent else wall
        attrs = {"sampling_time": sampling_time, "tuning_steps": spec["num_warmup"], "num_chains": spec["num_chains"],
                 "thin": spec["thin"], "chain_method": "data_parallel" if data_parallel else "distributed",
                 "world_size": comm.world_size}
        if not persistent:
            return in_memory(directory, spec["num_chains"], attrs, observed)
        sampling._finish(directory, content, summaries, run_attrs(**attrs, run_id=content["run_id"]), observed,
                         spec.get("keep_params"))
        return open_results(directory / RESULTS_FILE)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


# -- before sampling ------------------------------------------------------------------------------------


def _agree(spec: dict[str, Any], observed: Mapping[str, np.ndarray], comm: Comm, data_parallel: bool,
           chain_method: str, num_data: int) -> dict[str, Any]:
    """Every rank's checks and fingerprint (arguments, sampler options, model and data shapes), compared across the
    ranks before any sampling; an error on any rank is raised on all of them. Returns the manifest."""

    def local() -> tuple[dict[str, Any], tuple[str, str]]:
        if chain_method != "sequential":
            raise ValueError(f"chain_method={chain_method!r} under torch.distributed: every rank is already a process "
                             "of its own; use chain_method='sequential' (the default), and more ranks for more "
                             "processes")
        if data_parallel and is_iterable_data(spec["data"]):
            raise ValueError("data_parallel=True takes the data as tensors, a map-style Dataset or a "
                             "vr_mcmc.distributed.Shard, from which each rank reads only its own examples; a "
                             "DataLoader or other iterable would give every rank whole batches: pass its dataset")
        if data_parallel and num_data < comm.world_size:
            raise ValueError(f"data_parallel=True with {comm.world_size} ranks needs at least one example per rank; "
                             f"the data has {num_data}")
        data = spec["data"]
        if isinstance(data, Shard):
            rows = shard_range(num_data, comm.world_size, comm.rank)
            if not data_parallel or data.rows != rows:
                raise ValueError(f"rank {comm.rank} was given a Shard of examples {data.rows.start}.."
                                 f"{data.rows.stop - 1} but holds {rows.start}..{rows.stop - 1} "
                                 f"(shard_range({num_data}, {comm.world_size}, {comm.rank})) in data-parallel sampling"
                                 + ("" if data_parallel else "; and a Shard needs data_parallel=True"))
        fingerprint = preflight(spec, num_data, observed)
        if isinstance(data, Shard):
            fingerprint["data"] = data.fingerprint()
        content = manifest(spec, fingerprint)
        if data_parallel:
            content["data_parallel"] = {"world_size": comm.world_size}
        with torch.random.fork_rng(devices=[]):
            model, _ = build(spec, 0)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if data_parallel:
            check_backend(comm.backend, device)
        return content, (socket.gethostname(), str(device))

    value: Any
    mine: BaseException | None = None
    try:
        value = ("ok", *local())
    except Exception as exc:
        value, mine = ("error", f"{type(exc).__name__}: {exc}"), exc
    values = _all_ok(comm, value, mine, "comparing the ranks' arguments",
                     "rank {rank} refused the run before sampling: {message}")
    base = _flatten(values[0][1])
    for r, v in enumerate(values[1:], start=1):
        other = _flatten(v[1])
        diff = [k for k in sorted(set(base) | set(other), key=str) if base.get(k) != other.get(k)]
        if diff:
            listed = "; ".join(f"{k}: rank 0 {base.get(k)!r}, rank {r} {other.get(k)!r}" for k in diff[:8])
            raise ValueError(f"the ranks called vr_mcmc.sample with different arguments or data ({listed}); nothing "
                             "was sampled. Every rank must make the same call, with the same data")
    devices = [v[2] for v in values]
    cuda = [d for d in devices if d[1].startswith("cuda")]
    if "nccl" in comm.backend and len(set(cuda)) != len(cuda):  # NCCL refuses (or hangs on) a GPU shared by ranks
        same = sorted({d for d in cuda if cuda.count(d) > 1})
        raise ValueError(f"several ranks use the same GPU ({same}, host and device): one device per rank. Build the "
                         "model on torch.device('cuda', LOCAL_RANK) (torchrun sets LOCAL_RANK), or on 'cuda' after "
                         "torch.cuda.set_device(LOCAL_RANK)")
    return values[comm.rank][1]


def _rank0(comm: Comm, fn: Any, what: str) -> Any:
    """``fn()`` on rank 0, its result (or its error) on every rank."""
    result: Any = None
    mine: BaseException | None = None
    if comm.rank == 0:
        try:
            result = ("ok", fn())
        except Exception as exc:
            result, mine = ("error", f"{type(exc).__name__}: {exc}"), exc
    result = comm.broadcast_object(result, what)
    if mine is not None:
        raise mine
    if result[0] == "error":
        raise DistributedError(f"rank 0 failed {what}: {result[1]}")
    return result[1]


def _shared(directory: Path, comm: Comm, token: str) -> bool:
    """Whether this rank sees rank 0's directory (a shared file system): a probe file written by rank 0."""
    probe = directory / f".probe-{token}"
    if comm.rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    path = comm.broadcast_object(str(directory.resolve()), "probing the checkpoint directory")
    here = str(directory.resolve()) == path and probe.exists()
    everyone = comm.all_gather_object(here, "probing the checkpoint directory")
    if comm.rank == 0:
        probe.unlink()
    if not here:
        directory.mkdir(parents=True, exist_ok=True)
    return all(everyone)


# -- sampling -------------------------------------------------------------------------------------------


def _chains(spec: dict[str, Any], comm: Comm, token: str, directory: Path, shared: bool) -> list[dict[str, Any]]:
    """This rank's share of the chains (`chain_share`), each as in one process (same seeds, same files); then every
    rank's summaries (and, without a shared directory, its draw files) go to rank 0."""
    mine = chain_share(spec["num_chains"], comm.world_size, comm.rank)
    status: tuple[str, Any]
    error: BaseException | None = None
    beat = Heartbeat(comm, token)
    with beat:
        threads = torch.get_num_threads()
        try:
            with torch.random.fork_rng(devices=[]):
                status = ("ok", [run_chain(spec, c) for c in mine])
        except Exception as exc:
            status, error = ("error", f"{type(exc).__name__}: {exc}"), exc
        finally:
            torch.set_num_threads(threads)
    beat.wait_all("the other ranks' chains")
    statuses = _all_ok(comm, status, error, "collecting the chains' summaries",
                       "rank {rank} failed while sampling its chains: {message}. The draws and checkpoints of every "
                       "rank are kept: fix the cause and run the same command again to resume")
    summaries = [s for _, chains in statuses for s in chains]
    files = None
    if not shared:  # rank 0 cannot see this rank's draw files: send them
        names = [e["file"] for s in status[1] for entries in s["index"].values() for e in entries]
        files = {n: (directory / n).read_bytes() for n in names}
    gathered = comm.gather_object(files, "sending the draws to rank 0")
    if comm.rank == 0 and gathered is not None:
        for received in gathered[1:]:
            for name, data in (received or {}).items():
                path = directory / name
                if not path.exists() or sha256(path) != _sha(data):
                    tmp = path.with_suffix(".tmp")
                    tmp.write_bytes(data)
                    tmp.replace(path)
    return sorted(summaries, key=lambda s: s["chain"])


def _all_ok(comm: Comm, status: tuple, error: BaseException | None, what: str, failure: str) -> list:
    """Every rank's ``("ok", ...)`` or ``("error", message)``, gathered: this rank's own exception is raised as it
    is, another rank's as a `DistributedError` (``failure`` formatted with its rank and message), so that every
    rank stops together."""
    statuses = comm.all_gather_object(status, what)
    if error is not None:
        raise error
    failed = [(r, s[1]) for r, s in enumerate(statuses) if s[0] == "error"]
    if failed:
        r, message = failed[0]
        raise DistributedError(failure.format(rank=r, message=message))
    return statuses


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _data_parallel(spec: dict[str, Any], comm: Comm, *_: Any) -> list[dict[str, Any]]:
    """Every chain in turn, each across all ranks."""
    from .data_parallel import DataParallelRunner

    threads = torch.get_num_threads()
    summaries = []
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        with torch.random.fork_rng(devices=[]):
            for chain in range(spec["num_chains"]):
                summaries.append(DataParallelRunner(spec, chain, comm).run())
    except DistributedError:
        raise
    except BaseException:
        comm.abandon()  # the peers are in a collective this rank will not join: let them fail now
        raise
    finally:
        torch.set_num_threads(threads)
    return summaries
