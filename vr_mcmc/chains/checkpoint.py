"""The checkpoint directory: its manifest (which run it holds), per-chain state files, the merged results."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..recorder import Recorder, arviz_major

__all__ = ["MANIFEST_FILE", "RESULTS_FILE", "CheckpointError", "load_checkpoint", "manifest", "open_results",
           "prepare_directory", "save_atomic"]

RESULTS_FILE = "results.nc"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed: another run's, or damaged."""


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
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


def manifest(spec: dict[str, Any]) -> dict[str, Any]:
    record = spec["record"]
    return {
        "format": 1,
        "num_chains": spec["num_chains"], "num_warmup": spec["num_warmup"], "num_samples": spec["num_samples"],
        "thin": spec["thin"], "seed": spec["seed"], "batch_size": spec["batch_size"],
        "save_warmup": spec["save_warmup"], "checkpoint_every": spec["checkpoint_every"],
        "record": None if record is None else sorted(record) if isinstance(record, Mapping) else list(record),
        "log_likelihood": sorted(Recorder(None, spec["log_likelihood"]).log_likelihood),
    }


def prepare_directory(directory: Path, manifest: dict[str, Any]) -> bool:
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


def open_results(path: Path) -> Any:
    """The merged results, opened lazily, as `to_arviz` would return them."""
    import arviz
    import xarray as xr

    if arviz_major() >= 1:
        return xr.open_datatree(path, engine="h5netcdf")
    return arviz.from_netcdf(path)
