"""Waiting for ranks that run for different lengths of time, without hanging on a dead one.

With chains spread over ranks nothing is exchanged while the chains run, and a rank with one chain fewer waits for
the others at the end for up to a chain's duration: longer than a collective's timeout should be. So each rank
counts a heartbeat in the process group's own store (torch's TCPStore, the one torchrun's rendezvous made) while it
samples; a rank that has finished waits until every rank has posted "done", and declares a rank dead when its count
has not moved for `stall_seconds` (``VR_MCMC_STALL_SECONDS``, default 60) of the waiter's own clock (no clock is
compared across machines). Without a reachable store it falls back to a barrier under the group's timeout.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from .group import Comm, DistributedError

__all__ = ["Heartbeat", "stall_seconds"]


def stall_seconds() -> float:
    return float(os.environ.get("VR_MCMC_STALL_SECONDS", "60"))


def _store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # a torch without it, or no default group
        return None


class Heartbeat:
    """``with Heartbeat(comm, token):`` counts this rank's heartbeat while the block runs; `wait_all` then waits for
    every rank's "done". ``token``: the same on every rank and new for every call (keys of earlier calls stay)."""

    interval = 1.0

    def __init__(self, comm: Comm, token: str):
        self.comm, self.prefix, self.store = comm, f"vr_mcmc/{token}/", _store()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"{self.prefix}alive/{self.comm.rank}", 1)
            except Exception:  # the store is gone (its host died): the wait reports it
                return

    def __enter__(self) -> Heartbeat:
        if self.store is not None:
            self.store.add(f"{self.prefix}alive/{self.comm.rank}", 1)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="vr_mcmc heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(f"{self.prefix}done/{self.comm.rank}", "1")
        self._stop.set()

    def wait_all(self, what: str) -> None:
        """Returns once every rank has left its ``with`` block; raises `DistributedError` naming a rank whose heartbeat
        stopped before it did."""
        if self.store is None:
            self.comm.barrier(what)
            return
        stall = stall_seconds()
        ranks = range(self.comm.world_size)
        seen = {r: (-1, time.monotonic()) for r in ranks}
        try:
            while True:
                pending = [r for r in ranks if not self.store.check([f"{self.prefix}done/{r}"])]
                if not pending:
                    return
                now = time.monotonic()
                for r in pending:
                    count = self.store.add(f"{self.prefix}alive/{r}", 0)
                    if count != seen[r][0]:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > stall:
                        raise DistributedError(
                            f"rank {self.comm.rank}: rank {r} stopped before finishing its chains (no heartbeat for "
                            f"{stall:.0f} s: killed, out of memory, or its machine is gone) while this rank waited for "
                            f"{what}. Every checkpoint written so far is intact: run the same command again to resume")
                time.sleep(min(self.interval, 0.25))
        except DistributedError:
            raise
        except Exception as exc:  # the store's host died (rank 0 without torchrun)
            raise DistributedError(
                f"rank {self.comm.rank}: the process group's store is gone ({exc}) while waiting for {what}: rank 0 "
                "(or the launcher) stopped. Every checkpoint written so far is intact: run the same command again to "
                "resume") from exc
