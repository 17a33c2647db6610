"""The chain manager: `sample` runs chains of any torch_sample sampler and returns ArviZ data (DESIGN.md §7).

After NumPyro's ``MCMC``: per chain, ``torch.manual_seed(s)`` with s from `chain_seeds` (SeedSequence-style),
a fresh model from ``model_fn()`` and its sampler from ``sampler_fn(model)``; ``num_warmup`` steps (with adaptation
for MALA/HMC), then ``num_samples`` steps keeping every ``thin``-th (``num_samples // thin`` draws,
as NumPyro and Stan thin; a sampler with a schedule that reports ``stats["sampling_phase"] == 0``, e.g.
`torch_sample.schedules.Cyclical`'s exploration phase, makes no draw at that step, and a schedule's ``total_steps``
must equal num_warmup + num_samples). Minibatch samplers get
uniform batches of indices (a fresh seeded permutation each epoch); closure samplers (ULA, MALA,
HMC) a full-data closure; a sampler with a partitioned gradient table (``block_size=k``) unions of whole blocks of
its table's partition (`stream.BlockStream`). The data may also be a DataLoader over an IndexedDataset (any
iterable of ``(idx, *batch)``): see `loader`. ``sample_stats`` gets ``data_passes`` (per-example gradients since the
start over N, warmup included) unless the sampler reports its own.

With ``checkpoint=DIR`` draws go to disk as they are made (a small netCDF file per block of
``checkpoint_every`` draws, so memory holds one block; at the end they are merged into
``DIR/results.nc``, read lazily), and with every block the model, the
sampler (estimator tables, adaptation, generator), the global RNG and the batch stream are saved.
Calling `sample` again with the same arguments and directory after a crash resumes each chain from
its last checkpoint and gives the draws an uninterrupted run gives; a finished run is just read back.
A directory holding another run, or a damaged checkpoint, is refused and left as it is.

Modules, one concept each: `stream` (the data and the minibatch index stream), `loader` (DataLoaders and other
iterables of indexed batches), `blocks` (draw files and their merge), `checkpoint` (manifest, per-chain state, the
checkpoint directory), `params` (parameter draws kept with ``keep_params``: safetensors files and their index, read
by `vr_mcmc.PosteriorEnsemble`), `runner` (one chain), `parallel` (chains in worker processes), `vectorized`
(chains as one batched computation; `batched` its vmapped loss and gradients, `lockstep` the closure samplers'
turns), `sampling` (the public `sample`). Several ranks of torch.distributed (torchrun): `vr_mcmc.distributed`.
"""

from .batched import VectorizeError
from .checkpoint import CheckpointError
from .sampling import sample
from .stream import IndexStream as _IndexStream  # noqa: F401  (the name before the split; tests use it)
from .stream import chain_seeds

__all__ = ["CheckpointError", "VectorizeError", "chain_seeds", "sample"]
