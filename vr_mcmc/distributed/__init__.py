"""More than one process or machine: `vr_mcmc.sample` on torch.distributed (DESIGN.md §14).

Launch the same script on every rank with ``torchrun`` (gloo on CPU; NCCL on GPUs, one device per rank)::

    torchrun --nproc-per-node 4 script.py                      # one machine, 4 processes
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST0:29500 --rdzv-id run1 script.py    # on each of 2 machines

`vr_mcmc.sample` initializes the process group from torchrun's environment when the script has not (see
`group.resolve`), or uses ``process_group=``. Two ways to use the ranks:

- **chains across ranks** (the default on more than one rank): each rank runs its share of ``num_chains``
  (`chain_share`: contiguous chain numbers, the first ``num_chains % K`` ranks one more), each chain exactly as one
  process runs it (same per-chain seeds, same files: ``chain_<c>.pt`` and its draw blocks); rank 0 merges them into
  the result a one-process run gives (same draws, bit for bit) and returns it; the other ranks return None.
- **one chain across ranks** (``data_parallel=True``), as DDP: each rank holds a contiguous shard of the examples
  (`shard_range`) and the SAGA table's rows for them; every rank draws the same batch indices and the same noise,
  computes the gradients of its own examples, and the estimate is all-reduced (`estimators`), so the chain is the
  one-process chain up to the order of floating-point sums (float64: |Δθ| ≤ 1e-12 after 200 steps, tested).
  Chains run one after another, each on all ranks; rank 0 records the draws. Each rank reads only its own
  examples through ``data``; to load only them, pass a `Shard` (this rank's rows of the tensors).

Checkpoints (``checkpoint=DIR``): with chains across ranks, each rank writes its own chains' files; a directory on a
file system all ranks see is merged in place, and a rank-local one is sent to rank 0 at the end (so does a run
without ``checkpoint=``). Data parallel: each rank saves its state (its table rows) as ``chain_<c>.rank<r>.pt``.
After a rank dies, the others stop with a `DistributedError` (a collective fails at once when a peer's connection
closes, or after the group's timeout; ranks waiting for others' chains watch their heartbeat, `liveness`), the
checkpoints stay intact, and the same command resumes to the same result.
"""

from .group import DEFAULT_TIMEOUT, DistributedError
from .sharding import Shard, chain_share, shard_range

__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "Shard", "chain_share", "shard_range"]
