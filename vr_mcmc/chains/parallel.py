"""Chains in worker processes (``chain_method="parallel"``)."""

from __future__ import annotations

import os
from typing import Any

from .runner import run_chain

__all__ = ["run_parallel"]


def run_parallel(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=min(spec["num_chains"], os.cpu_count() or 1)) as pool:
        results = [pool.apply_async(run_chain, (spec, c)) for c in range(spec["num_chains"])]
        return [r.get() for r in results]
