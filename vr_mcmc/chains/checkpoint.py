"""The checkpoint directory: its manifest (which run it holds, with what options; the blocks and the
checksum of the merged results once finished), per-chain state files, checksums, and a full disk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..recorder import Recorder, arviz_major

__all__ = ["MANIFEST_FILE", "RESULTS_FILE", "CheckpointError", "DiskFullError", "disk_guard", "file_entry",
           "load_checkpoint", "manifest", "open_results", "prepare_directory", "save_atomic", "verify_file",
           "write_manifest"]

RESULTS_FILE = "results.nc"
MANIFEST_FILE = "manifest.json"
FORMAT = 2
UNCOMPARED = ("run_id", "results", "blocks")  # what a finished run adds to its manifest


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed: another run's, or damaged."""


class DiskFullError(OSError, CheckpointError):
    """The disk holding the draws is full (an OSError with errno ENOSPC, and a CheckpointError)."""


# -- files --------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path, draws: int | None = None) -> dict[str, Any]:
    """What the manifest and the chain checkpoints record of a file: name, bytes, sha256 (and draws)."""
    entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    if draws is not None:
        entry["draws"] = draws
    return entry


def verify_file(directory: Path, entry: Mapping[str, Any], fix: str) -> None:
    """Raises CheckpointError if the file is missing, truncated or changed since ``entry`` was taken."""
    path = directory / entry["file"]
    if not path.exists():
        problem = "is missing"
    elif path.stat().st_size != entry["bytes"]:
        problem = f"has {path.stat().st_size} bytes where {entry['bytes']} were written (truncated or replaced)"
    elif sha256(path) != entry["sha256"]:
        problem = "does not match its checksum (corrupted or replaced)"
    else:
        return
    raise CheckpointError(f"{path} {problem}; nothing was changed. {fix}")


@contextlib.contextmanager
def disk_guard(directory: Path, needed: int, what: str, tmp: Path | None = None) -> Iterator[None]:
    """Checks the free space before a write and turns a full disk during it (ENOSPC, EDQUOT, or
    torch.save's "unexpected pos" and HDF5's write errors when the disk is full) into a `DiskFullError`
    naming the directory and the space needed; the partial file ``tmp`` is removed."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise _disk_full(directory, needed, free, what)
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        free = shutil.disk_usage(directory).free
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < needed:
            raise _disk_full(directory, needed, free, what) from exc
        raise


def _disk_full(directory: Path, needed: int, free: int, what: str) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, (
        f"no space left to write {what} in {directory}: {free / 2**20:.2f} MiB free, about {needed / 2**20:.2f} MiB "
        "needed. The draws and checkpoints written before are intact: free space (or move the directory to a "
        "larger disk) and call again with the same arguments to resume"), str(directory))


def save_atomic(obj: Any, path: Path, needed: int) -> None:
    tmp = path.with_suffix(".tmp")
    with disk_guard(path.parent, needed, f"the checkpoint {path.name}", tmp):
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"the checkpoint {path} cannot be read ({type(exc).__name__}: {exc}). The draws already written are "
            f"untouched; to restart this chain from its beginning, delete {path} and the chain's .nc files"
        ) from exc


# -- the manifest --------------------------------------------------------------------------------------


def manifest(spec: dict[str, Any], fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    record = spec["record"]
    return {
        "format": FORMAT,
        "num_chains": spec["num_chains"], "num_warmup": spec["num_warmup"], "num_samples": spec["num_samples"],
        "thin": spec["thin"], "seed": spec["seed"], "batch_size": spec["batch_size"],
        "save_warmup": spec["save_warmup"], "checkpoint_every": spec["checkpoint_every"],
        **({"keep_params": spec["keep_params"]} if spec.get("keep_params") else {}),
        "record": None if record is None else sorted(record) if isinstance(record, Mapping) else list(record),
        "log_likelihood": sorted(Recorder(None, spec["log_likelihood"]).log_likelihood),
        **{k: json.loads(json.dumps(v)) for k, v in fingerprint.items()},
    }


def write_manifest(directory: Path, content: Mapping[str, Any]) -> None:
    path = directory / MANIFEST_FILE
    tmp = path.with_suffix(".tmp")
    text = json.dumps(content, indent=1)
    with disk_guard(directory, len(text) + 4096, MANIFEST_FILE, tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def prepare_directory(directory: Path, wanted: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Creates or checks the checkpoint directory; (its manifest, whether it holds a verified finished run)."""
    path = directory / MANIFEST_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is damaged ({exc}); nothing was changed. Use a new checkpoint directory, "
                                  "or restore the file") from exc
        saved = _flatten({k: v for k, v in old.items() if k not in UNCOMPARED})
        asked = _flatten({k: v for k, v in wanted.items() if k not in UNCOMPARED})
        diff = [k for k in sorted(set(saved) | set(asked), key=str) if saved.get(k) != asked.get(k)]
        if diff:
            listed = ", ".join(f"{k}: saved {saved.get(k)!r}, asked {asked.get(k)!r}" for k in diff)
            raise CheckpointError(f"the checkpoint directory {directory} holds another run ({listed}); nothing was "
                                  "changed. Call with the same arguments to resume it, or give a new directory")
        return old, _finished(directory, old)
    leftovers = {p.name for p in directory.iterdir()} if directory.exists() else set()
    if leftovers - {path.with_suffix(".tmp").name}:  # a manifest.tmp alone: a crash before its rename
        raise CheckpointError(f"the checkpoint directory {directory} is not empty and holds no {MANIFEST_FILE}: it is "
                              "not a vr_mcmc run; nothing was changed. Give a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    content = {**wanted, "run_id": uuid.uuid4().hex}
    write_manifest(directory, content)
    return content, False


def _finished(directory: Path, content: Mapping[str, Any]) -> bool:
    """True if the manifest records merged results and ``results.nc`` is exactly that file."""
    results = directory / RESULTS_FILE
    entry = content.get("results")
    if entry is None:
        if results.exists() and results_run_id(results) != content.get("run_id"):
            raise CheckpointError(f"{results} is not this run's (its run_id differs from {MANIFEST_FILE}'s); nothing "
                                  "was changed. Move it away, then call again to resume this run")
        return False  # none, or this run's own merge that died before the manifest recorded it: merged again
    fix = (f"This run finished and its blocks were removed once {RESULTS_FILE} was verified: restore that file "
           f"(sha256 {entry['sha256']}), or delete the directory to sample again")
    verify_file(directory, entry, fix)
    return True


def results_run_id(path: Path) -> str | None:
    import h5netcdf

    try:
        with h5netcdf.File(path, "r") as f:
            for g in f.groups.values():
                if "run_id" in g.attrs:
                    return str(g.attrs["run_id"])
    except Exception:
        return None
    return None


def open_results(path: Path) -> Any:
    """The merged results, opened lazily, as `to_arviz` would return them."""
    import arviz
    import xarray as xr

    if arviz_major() >= 1:
        return xr.open_datatree(path, engine="h5netcdf")
    return arviz.from_netcdf(path)
