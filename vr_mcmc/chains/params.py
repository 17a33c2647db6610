"""Parameter draws on disk: every k-th kept draw's state dict as a safetensors file (DESIGN.md §15).

Layout, in the ``checkpoint=`` directory of `vr_mcmc.sample` or a `Recorder`'s ``directory``::

    params/chain_<c>.<d>.safetensors   the model's state dict (parameters and buffers) at posterior draw d
                                       (0-based, 6 digits) of chain c; its metadata: one key, "vr_mcmc",
                                       holding JSON {"format", "chain", "draw"} (one key: safetensors writes
                                       several in hash order, and a resumed run must write the same bytes)
    ensemble.json                      the index: format, keep_params, the state dict's keys (shape, dtype),
                                       per chain its files in draw order (file, bytes, sha256, draw)

``keep_params=k`` keeps the k-th, 2k-th, ... draw of each chain (draws d = k−1, 2k−1, ...), as ``thin`` keeps
the thin-th, 2·thin-th, ... step: ``num_samples=1000, thin=2, keep_params=5`` gives 100 parameter draws per
chain, posterior draws 4, 9, ..., 499.

Crash safety, as for the draw blocks: a file is written under a temporary name, fsynced and renamed, so a kill
leaves no half file under a final name; each chain's checkpoint lists the files written before it (bytes,
sha256); a resume verifies them and deletes every other file of the chain (written after the checkpoint, or a
temporary one), which the resumed chain writes again, identically. So the ensemble holds every draw exactly once.
``ensemble.json`` is written (atomically) when the run finishes; `vr_mcmc.PosteriorEnsemble` reads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, disk_guard, load_checkpoint, sha256, verify_file

__all__ = ["FORMAT", "INDEX_FILE", "PARAMS_DIR", "ChainParams", "check_keep_params", "read_header",
           "repair_index", "state_tensors", "write_index"]

FORMAT = "vr_mcmc.ensemble/1"
INDEX_FILE = "ensemble.json"
PARAMS_DIR = "params"
SUFFIX = ".safetensors"


def check_keep_params(keep_params: Any, directory: Any, draws: int | None = None, what: str = "checkpoint") -> None:
    """``keep_params``: None, or an integer >= 1 with a directory to write to; with ``draws`` (kept draws per
    chain) it must keep at least one."""
    if keep_params is None:
        return
    if isinstance(keep_params, bool) or not isinstance(keep_params, int) or keep_params < 1:
        raise ValueError(f"keep_params must be an integer >= 1 (save every k-th kept draw's parameters) or None, "
                         f"got {keep_params!r}")
    if directory is None:
        raise ValueError(f"keep_params={keep_params} writes parameter draws to disk and needs a directory: pass "
                         f"{what}='DIR' (then read the ensemble with vr_mcmc.PosteriorEnsemble('DIR', model))")
    if draws is not None and keep_params > draws:
        raise ValueError(f"keep_params={keep_params} saves every {keep_params}-th of the {draws} draws per chain "
                         f"(num_samples // thin), so none: use keep_params <= {draws}")


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict (parameters and persistent buffers) as contiguous CPU tensors that share no memory
    (safetensors refuses shared tensors: tied weights are stored once per name)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the model's state dict holds {key!r} = a {type(value).__name__}, not a tensor: "
                            "safetensors stores tensors only (drop the extra state, or keep its value in a buffer)")
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != value.numel() * value.element_size():
            value = value.clone()  # a view into a larger or a shared storage: its own bytes
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def draw_metadata(chain: int, draw: int) -> dict[str, str]:
    return {"vr_mcmc": json.dumps({"format": FORMAT, "chain": chain, "draw": draw})}


def _save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """safetensors' own writer (one place, so that the fault tests can stop a write half-way)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata))


def write_draw(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Writes one draw atomically (temporary name, fsync, rename); returns its index entry (file relative to
    the ensemble directory, bytes, sha256)."""
    tmp = path.with_name(path.name + ".tmp")
    needed = 2 * sum(t.numel() * t.element_size() for t in tensors.values()) + 2**16
    with disk_guard(path.parent, needed, f"the parameter draw {path.name}", tmp):
        _save(tensors, tmp, metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return {"file": f"{PARAMS_DIR}/{path.name}", "bytes": path.stat().st_size, "sha256": sha256(path)}


class ChainParams:
    """One chain's parameter draws: ``offer(model)`` at each kept draw writes every ``every``-th; the state
    (draws offered, files written) goes into the chain's checkpoint and resumes exactly (see the module)."""

    def __init__(self, directory: str | os.PathLike, chain: int, every: int):
        self.directory, self.chain, self.every = Path(directory), chain, every
        self.folder = self.directory / PARAMS_DIR
        self.seen = 0  # draws offered so far (the chain's posterior draws)
        self.index: list[dict[str, Any]] = []

    def path(self, draw: int) -> Path:
        return self.folder / f"chain_{self.chain}.{draw:06d}{SUFFIX}"

    def offer(self, model: torch.nn.Module) -> None:
        """Called at each kept posterior draw: writes the model's state dict if the draw is an ``every``-th."""
        draw = self.seen
        self.seen += 1
        if (draw + 1) % self.every:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = write_draw(self.path(draw), state_tensors(model), draw_metadata(self.chain, draw))
        self.index.append({**entry, "draw": draw})

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "index": [dict(e) for e in self.index]}

    def resume(self, state: Mapping[str, Any] | None) -> None:
        """Restores the state saved with the chain's checkpoint (None: from the start), verifies the files it
        lists and deletes the chain's other files (written after that checkpoint; made again, identically)."""
        self.seen, self.index = (0, []) if state is None else (int(state["seen"]), [dict(e) for e in state["index"]])
        fix = (f"Restore the file, or delete chain_{self.chain}.pt, chain_{self.chain}.*.nc and "
               f"{PARAMS_DIR}/chain_{self.chain}.*{SUFFIX} to draw chain {self.chain} again from its start "
               "(same call, same arguments)")
        for entry in self.index:
            verify_file(self.directory, entry, fix)
        listed = {Path(e["file"]).name for e in self.index}
        if self.folder.is_dir():
            for p in self.folder.glob(f"chain_{self.chain}.*"):
                if p.name not in listed:
                    p.unlink()


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({key: {"shape", "dtype"}}, metadata) of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None) or {}
    return {k: {"shape": list(v["shape"]), "dtype": v["dtype"]} for k, v in header.items()}, metadata


def write_index(directory: str | os.PathLike, chains: Sequence[Sequence[Mapping[str, Any]]], keep_params: int,
                chain_ids: Sequence[int] | None = None, source: str = "vr_mcmc.sample") -> Path:
    """Writes ``ensemble.json`` (atomically) for the chains' file lists, after checking that each listed file is
    there with its size; the state dict's keys, shapes and dtypes come from the first file's header."""
    directory = Path(directory)
    for c, entries in enumerate(chains):
        for entry in entries:
            path = directory / entry["file"]
            if not path.exists() or path.stat().st_size != entry["bytes"]:
                raise CheckpointError(f"the parameter draw {path} of chain {c} is missing or has another size than "
                                      "when it was written; nothing was changed. Restore it, or delete the chain's "
                                      "files to draw it again")
    first = next((entries[0] for entries in chains if entries), None)
    spec = read_header(directory / first["file"])[0] if first is not None else {}
    content = {"format": FORMAT, "source": source, "keep_params": keep_params,
               "chain_ids": list(chain_ids) if chain_ids is not None else list(range(len(chains))),
               "state_dict": spec, "chains": [[dict(e) for e in entries] for entries in chains]}
    path = directory / INDEX_FILE
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(content, indent=1)
    with disk_guard(directory, len(text) + 4096, INDEX_FILE, tmp):
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def repair_index(directory: str | os.PathLike, num_chains: int, keep_params: int) -> None:
    """A finished run whose ``ensemble.json`` is missing or unreadable: written again from the file lists in the
    chains' checkpoints (kept after the run), each file verified against its checksum."""
    directory = Path(directory)
    try:
        if json.loads((directory / INDEX_FILE).read_text()).get("format") == FORMAT:
            return
    except (OSError, ValueError, AttributeError):
        pass
    chains = []
    for c in range(num_chains):
        state = load_checkpoint(directory / f"chain_{c}.pt").get("params") or {"index": []}
        for entry in state["index"]:
            verify_file(directory, entry, f"Restore it, or sample again in a new directory (chain {c}'s parameter "
                                          "draws cannot be made again without redrawing the chain)")
        chains.append(state["index"])
    write_index(directory, chains, keep_params)
