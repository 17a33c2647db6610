"""The process group a run uses, and collectives that turn a lost rank into a clear error.

`resolve` finds the group: the one passed as ``process_group=``, the default group if the user initialized one,
or a new one from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): gloo
for CPU tensors, and where CUDA is present ``"cpu:gloo,cuda:nccl"`` with this rank's GPU (``LOCAL_RANK``) made the
current device, so that each rank drives one GPU. Its timeout is `DEFAULT_TIMEOUT`: a collective that a dead or
stuck rank never joins fails after it instead of hanging (torch's own default is 30 min for gloo); a user who
wants another initializes the group with ``timeout=`` before calling `vr_mcmc.sample`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

__all__ = ["DEFAULT_TIMEOUT", "TRAFFIC", "Comm", "DistributedError", "check_backend", "resolve"]

DEFAULT_TIMEOUT = timedelta(minutes=10)

# This process's all-reduce traffic since it started (bytes of the tensors all-reduced, and calls), as
# torch.cuda.memory_stats counts memory: for the communication volume per step (benchmarks/distributed.py).
TRAFFIC = {"all_reduce_bytes": 0, "all_reduce_calls": 0}


class DistributedError(RuntimeError):
    """Another rank failed, was killed, or disagrees: the run stopped on every rank that is still alive."""


@dataclass
class Comm:
    """A process group with this process's rank in it and the world size; its collectives raise
    `DistributedError` (naming the step being made) when a peer is gone."""

    group: Any
    rank: int
    world_size: int
    backend: str
    created: bool  # initialized here (then destroyed on a failure, so that peers stop at once)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except DistributedError:
            raise
        except Exception as exc:  # gloo: "Connection closed by peer", a timeout; NCCL: DistBackendError
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({type(exc).__name__}: {_first_line(exc)})"
                ": another rank stopped (killed, out of memory, or an error of its own: see its output), or did not "
                "answer within the process group's timeout. Every checkpoint written so far is intact: run the same "
                "command again to resume") from exc

    def all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        import torch.distributed as dist

        self._call(what, lambda: dist.all_reduce(tensor, group=self.group))
        TRAFFIC["all_reduce_bytes"] += tensor.numel() * tensor.element_size()
        TRAFFIC["all_reduce_calls"] += 1
        return tensor

    def all_gather_object(self, value: Any, what: str) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._call(what, lambda: dist.all_gather_object(out, value, group=self.group))
        return out

    def gather_object(self, value: Any, what: str) -> list[Any] | None:
        """``value`` of every rank on rank 0 (in rank order); None on the others."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self._call(what, lambda: dist.gather_object(value, out, dst=dst, group=self.group))
        return out

    def broadcast_object(self, value: Any, what: str) -> Any:
        import torch.distributed as dist

        box = [value]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        self._call(what, lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def barrier(self, what: str, timeout: timedelta | None = None) -> None:
        """A barrier; on gloo a monitored one, whose error names the ranks that never arrived."""
        import torch.distributed as dist

        if "gloo" in self.backend:
            self._call(what, lambda: dist.monitored_barrier(group=self.group, timeout=timeout, wait_all_ranks=True))
        else:
            self._call(what, lambda: dist.barrier(group=self.group))

    def abandon(self) -> None:
        """After a failure on this rank: destroy a group initialized here, so that the peers waiting in a collective
        fail at once (their connections close) instead of after the timeout."""
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            with contextlib.suppress(Exception):  # already broken
                dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _launched() -> int:
    """The world size torchrun (or another launcher setting its variables) gives this process; 0 if none."""
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return 0
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        return 0


def resolve(process_group: Any, data_parallel: bool) -> Comm | None:
    """The group the run uses, or None for a plain one-process run (no group, a world of one without
    ``data_parallel``, or ``process_group=False``: each rank runs its own independent `sample`)."""
    import torch.distributed as dist

    if process_group is False:  # this rank samples on its own, whatever the launcher
        if data_parallel:
            raise ValueError("data_parallel=True runs one chain across ranks: it cannot run with process_group=False")
        return None
    if process_group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group= was given but torch.distributed is not initialized: call "
                             "torch.distributed.init_process_group(...) first, or leave process_group=None")
        group, created = process_group, False
    elif dist.is_available() and dist.is_initialized():
        group, created = dist.group.WORLD, False
    elif dist.is_available() and (_launched() > 1 or (data_parallel and _launched() >= 1)):
        _init_from_environment()
        group, created = dist.group.WORLD, True
    else:
        if data_parallel:
            raise ValueError("data_parallel=True runs one chain across the ranks of torch.distributed, but there is "
                             "none: launch the script with `torchrun --nproc-per-node K script.py` (or call "
                             "torch.distributed.init_process_group first)")
        return None
    size = dist.get_world_size(group)
    if size == 1 and not data_parallel:
        return None
    return Comm(group, dist.get_rank(group), size, str(dist.get_backend(group)), created)


def _init_from_environment() -> None:
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)  # one GPU per rank: models built on "cuda" land on this rank's own
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=DEFAULT_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=DEFAULT_TIMEOUT)


def check_backend(backend: str, device: torch.device) -> None:
    """Refuses a backend that cannot all-reduce the model's tensors: NCCL (alone) moves CUDA tensors only."""
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group's backend is NCCL, which moves CUDA tensors only, but the model's "
                         f"parameters are on {device}: build the model on this rank's GPU (in model_fn: "
                         "model.to(torch.device('cuda', int(os.environ['LOCAL_RANK'])))), or initialize the group with "
                         "backend='gloo' (CPU tensors) or 'cpu:gloo,cuda:nccl'")
