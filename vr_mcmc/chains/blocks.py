"""Draw files: a chain's draws as small netCDF blocks, and their merge into one result (file or memory)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..recorder import GROUPS, dataset, observed_dataset, to_arviz
from .checkpoint import CheckpointError, disk_guard, file_entry, verify_file

__all__ = ["ChainBlocks", "block_length", "in_memory", "merge", "read_group", "verify_blocks", "write_block"]


def write_block(path: Path, block: dict[str, dict[str, list[np.ndarray]]]) -> dict[str, Any]:
    """One block of a chain's draws as a small netCDF file (groups of variables over ``draw``),
    written under a temporary name and renamed, so a crash never leaves half a block; returns its
    entry for the chain's block list (file, bytes, sha256, draws)."""
    tmp = path.with_suffix(".tmp")
    needed = 2 * sum(np.asarray(v).nbytes for columns in block.values() for values in columns.values()
                     for v in values) + 256 * 1024
    with disk_guard(path.parent, needed, f"the draws {path.name}", tmp):
        _write_netcdf(tmp, block)
        os.replace(tmp, path)
    draws = max((len(values) for columns in block.values() for values in columns.values()), default=0)
    return file_entry(path, draws)


def _write_netcdf(tmp: Path, block: dict[str, dict[str, list[np.ndarray]]]) -> None:
    import h5netcdf

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


class ChainBlocks:
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


def block_length(path: Path, group: str) -> int:
    """Draws in one block file (its ``draw`` dimension), without reading the data."""
    import h5netcdf

    with h5netcdf.File(path, "r") as f:
        return f.groups[group].dimensions["draw"].size if group in f.groups else 0


def read_group(path: Path, group: str) -> dict[str, np.ndarray]:
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


def verify_blocks(directory: Path, chain: int, index: Mapping[str, list[dict[str, Any]]]) -> None:
    """Checks that the blocks a chain's checkpoint lists are on disk as they were written."""
    stems = " ".join(f"{ChainBlocks(directory, chain, w).stem}.*.nc" for w in (False, True))
    fix = (f"Restore the file, or delete chain_{chain}.pt and {stems} to draw chain {chain} again from its start "
           "(same call, same arguments)")
    for entries in index.values():
        for entry in entries:
            verify_file(directory, entry, fix)


def merge(directory: Path, indexes: list[Mapping[str, list[dict[str, Any]]]], out: Path, attrs: dict[str, Any],
          observed_data: Mapping[str, np.ndarray]) -> None:
    """The chains' block files (``indexes[c]``: chain c's block lists, verified here) -> one netCDF file
    with groups over (chain, draw, ...), one block in memory; the file is checked before it is renamed."""
    import h5netcdf

    for c, index in enumerate(indexes):
        verify_blocks(directory, c, index)
    expected = {}
    tmp = out.with_suffix(".partial")
    needed = sum(e["bytes"] for index in indexes for entries in index.values() for e in entries) + 2**20
    with disk_guard(directory, needed, f"the merged {out.name}", tmp):
        with h5netcdf.File(tmp, "w") as dst:
            for warmup, kind in ((False, "draws"), (True, "warmup")):
                chains = [[directory / e["file"] for e in index[kind]] for index in indexes]
                if not all(chains):
                    continue
                lengths = {sum(e["draws"] for e in index[kind]) for index in indexes}
                if len(lengths) != 1:
                    raise CheckpointError(f"the chains in {directory} hold different numbers of {kind} "
                                          f"({sorted(lengths)}); nothing was merged. Delete the shorter chains' "
                                          "files to redraw them")
                n = lengths.pop()
                for group in GROUPS:
                    name = ("warmup_" if warmup else "") + group
                    if _merge_group(dst, chains, group, name, attrs):
                        expected[name] = n
            if observed_data:
                g = dst.create_group("observed_data")
                for name, value in observed_data.items():
                    dims = tuple(f"{name}_dim_{i}" for i in range(value.ndim))
                    for d, size in zip(dims, value.shape):
                        g.dimensions[d] = size
                    g.create_variable(name, dims, data=value)
                g.attrs.update({k: attrs[k] for k in ("created_at", "inference_library") if k in attrs})
        _check_merged(tmp, expected, len(indexes))
        os.replace(tmp, out)


def _check_merged(path: Path, expected: Mapping[str, int], num_chains: int) -> None:
    """Reads the merged file back: every group with (chain, draw) sizes as the blocks say."""
    import h5netcdf

    with h5netcdf.File(path, "r") as f:
        for name, draws in expected.items():
            sizes = (f.groups[name].dimensions["chain"].size, f.groups[name].dimensions["draw"].size)
            if sizes != (num_chains, draws):
                raise CheckpointError(f"the merged {path} has {sizes} (chain, draw) in {name}, not "
                                      f"{(num_chains, draws)}; the blocks are kept: call again to merge again")


def _merge_group(dst: Any, chains: list[list[Path]], group: str, name_out: str, attrs: dict[str, Any]) -> bool:
    """One group of every chain's blocks into ``dst[name_out]``, over (chain, draw, ...); False if none."""
    first = read_group(chains[0][0], group)
    if not first:
        return False
    num_chains = len(chains)
    lengths = [sum(block_length(p, group) for p in paths) for paths in chains]
    n = min(lengths)
    g = dst.create_group(name_out)
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
            block = read_group(p, group)
            size = min(len(next(iter(block.values()))), n - start)
            for name, value in block.items():
                variables[name][c, start : start + size] = value[:size]
            start += size
    g.attrs.update(attrs)
    return True


def in_memory(directory: Path, num_chains: int, attrs: dict[str, Any], observed: Mapping[str, np.ndarray],
              partial: bool = False) -> Any:
    """Reads the chains' blocks into memory (a run without ``checkpoint``) and builds the ArviZ object.
    ``partial``: the draws of an interrupted run: only the chains with draws, the shorter ones padded
    with NaN to the longest (booleans and integers become floats), so that no draw is dropped."""
    groups = {}
    for warmup in (False, True):
        chains = [ChainBlocks(directory, c, warmup).paths() for c in range(num_chains)]
        kept = [c for c in range(num_chains) if chains[c]] if partial else list(range(num_chains))
        if not kept or not all(chains[c] for c in kept):
            continue
        for group in GROUPS:
            columns: dict[str, list[np.ndarray]] = {}
            for c in kept:
                parts = [read_group(p, group) for p in chains[c]]
                for name in parts[0]:
                    columns.setdefault(name, []).append(np.concatenate([part[name] for part in parts]))
            if columns:
                stack = _pad if partial else _truncate
                groups[("warmup_" if warmup else "") + group] = dataset(
                    {k: stack(v) for k, v in columns.items()}, chains=kept)
    if observed:
        groups["observed_data"] = observed_dataset(observed)
    return to_arviz(groups, **attrs)


def _truncate(arrays: list[np.ndarray]) -> np.ndarray:
    n = min(len(a) for a in arrays)
    return np.stack([a[:n] for a in arrays])


def _pad(arrays: list[np.ndarray]) -> np.ndarray:
    n = max(len(a) for a in arrays)
    if all(len(a) == n for a in arrays):
        return np.stack(arrays)
    out = np.full((len(arrays), n, *arrays[0].shape[1:]), np.nan)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out
