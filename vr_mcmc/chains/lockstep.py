"""Closure samplers in lockstep: each chain's own ``sampler.step(closure)`` runs in a thread of its own, and every
call of its closure hands control back to the driver, which evaluates all waiting chains' closures as one batched
computation and hands each its result. Exactly one thread runs at a time (the driver passes a baton), so the
chains' torch RNG states can be swapped at each hand-over and every chain draws what it would alone: its steps are
the sequential chain's, whatever number of closure calls a step makes (HMC's leapfrogs, MALA's proposal, a NUTS
tree of its own depth; a chain whose step is done simply waits for the others).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ChainThread"]


class _Abort(BaseException):
    """Ends a step whose run was stopped (an error in another chain, an interrupt)."""


class ChainThread:
    """A daemon thread that runs one chain's steps, parked whenever its closure waits for the driver."""

    def __init__(self, name: str):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = False  # inside a step (parked in its closure, or running)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            work = self._inbox.get()
            if work is None:
                return
            try:
                work()
            except _Abort:
                self._outbox.put(("aborted", None))
            except BaseException as exc:  # passed to the driver, which raises it
                self._outbox.put(("error", exc))
            else:
                self._outbox.put(("done", None))

    def closure(self) -> Any:
        """The closure the chain's sampler gets: asks the driver for the loss at the chain's current parameters
        (the driver sets their ``.grad`` before answering)."""
        self._outbox.put(("eval", None))
        reply = self._inbox.get()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def start(self, work: Callable[[], Any]) -> str:
        """Runs ``work`` (one step) until it asks for an evaluation ("eval") or ends ("done")."""
        self.busy = True
        return self._receive(self._send(work))

    def answer(self, loss: torch.Tensor) -> str:
        """Hands the loss to the parked closure; runs until the next evaluation or the end of the step."""
        return self._receive(self._send(loss))

    def _send(self, item: Any) -> None:
        self._inbox.put(item)

    def _receive(self, _: None) -> str:
        kind, exc = self._outbox.get()
        if kind != "eval":
            self.busy = False
        if kind == "error":
            raise exc
        return kind

    def close(self) -> None:
        """Stops the thread (a parked step is aborted first; its sampler restores its state as on any error)."""
        if self.busy:
            self._inbox.put(_Abort())
            self._outbox.get()
            self.busy = False
        self._inbox.put(None)
        self._thread.join(timeout=10)
