"""Chains in worker processes (``chain_method="parallel"``): one spawned process per chain, at most one per
core at a time, watched by the parent: a worker that dies (the OOM killer's SIGKILL) fails the run with a
clear error instead of a hang; a script without a ``__main__`` guard is refused before any worker starts;
a worker whose parent dies stops."""

from __future__ import annotations

import ast
import os
import sys
import threading
import traceback
from typing import Any

from .runner import run_chain

__all__ = ["WorkerError", "check_main_guard", "run_parallel"]


class WorkerError(RuntimeError):
    """A chain's worker process died without reporting (killed, crashed, or failed to start)."""


def check_main_guard() -> None:
    """Refuses a call from a script's top level outside ``if __name__ == "__main__":``: spawned workers
    re-import the script, and each would start the run again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.exists(path):
        return  # interactive, python -c, or a notebook: nothing is re-imported
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") in
                                     ("__main__", "__mp_main__")):
        frame = frame.f_back
    if frame is None or os.path.abspath(frame.f_code.co_filename) != os.path.abspath(path):
        return  # called from a function the script's guarded code called
    line = frame.f_lineno
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return
    for node in tree.body:
        test = ast.unparse(node.test) if isinstance(node, ast.If) else ""
        if "__name__" in test and "__main__" in test and node.lineno <= line <= (node.end_lineno or node.lineno):
            return
    raise RuntimeError(
        f"vr_mcmc.sample(chain_method='parallel') is called at the top level of {path} (line {line}) outside an "
        "`if __name__ == \"__main__\":` block. Its workers start with 'spawn', which imports the script again, so "
        "each worker would start the run again. Put the call (and what should run once) under "
        "`if __name__ == \"__main__\":`, and keep model_fn, sampler_fn and loss_fn at module level")


def _watch_parent() -> None:
    """Exits this worker as soon as its parent process is gone (killed), so that no orphan keeps sampling."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _worker(spec: dict[str, Any], chain: int, conn: Any) -> None:
    _watch_parent()
    try:
        conn.send(("ok", run_chain(spec, chain)))
    except BaseException as exc:
        try:
            conn.send(("error", exc, traceback.format_exc()))
        except Exception:  # an exception that cannot be pickled
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc()))
    finally:
        conn.close()


def run_parallel(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import multiprocessing.connection
    import signal

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    pending = list(range(spec["num_chains"]))
    running: dict[int, tuple[Any, Any]] = {}  # chain -> (process, connection)
    results: dict[int, dict[str, Any]] = {}
    width = min(spec["num_chains"], os.cpu_count() or 1)
    try:
        while pending or running:
            while pending and len(running) < width:
                chain = pending.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_worker, args=(spec, chain, send), daemon=True,
                                      name=f"vr_mcmc chain {chain}")
                process.start()
                send.close()
                running[chain] = (process, receive)
            ready = multiprocessing.connection.wait([c for _, c in running.values()])
            for chain in [c for c, (_, conn) in running.items() if conn in ready]:
                process, conn = running.pop(chain)
                try:
                    message = conn.recv()
                except EOFError:
                    message = None
                process.join()
                if message is None:
                    code = process.exitcode
                    how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                           else f"exited with code {code}")
                    raise WorkerError(
                        f"the worker process of chain {chain} {how} without reporting. SIGKILL is what the "
                        "out-of-memory killer sends: check `dmesg` and the memory per chain (fewer chains at once, "
                        "a smaller batch). The draws written before are kept (resumable with checkpoint=)")
                if message[0] == "error":
                    exc, text = message[1], message[2]
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"in the worker of chain {chain}:\n{text}")
                    raise exc
                results[chain] = message[1]
    finally:
        for process, _ in running.values():  # on an error: stop the other chains (their blocks are kept)
            process.terminate()
        for process, conn in running.values():
            process.join()
            conn.close()
    return [results[c] for c in range(spec["num_chains"])]
