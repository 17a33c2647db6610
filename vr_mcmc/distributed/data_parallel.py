"""One chain across ranks (``vr_mcmc.sample(..., data_parallel=True)``): `DataParallelRunner`.

Every rank builds the same model and sampler (same seed), draws the same global batch of indices from the same
stream and the same noise from the same generator, and computes the gradients of its own examples only
(`vr_mcmc.distributed.estimators`); the all-reduced estimate is the same bytes on every rank, so the parameters
stay bitwise equal across ranks (checked at every checkpoint) and equal the one-process chain's up to the order of
floating-point sums. Rank 0 records the draws; every rank checkpoints its own state (its table rows) as
``chain_<c>.rank<r>.pt``, keeping the one before (``.prev.pt``), and a resume starts all ranks from the latest step
that every rank has saved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..chains.checkpoint import load_checkpoint
from ..chains.runner import KINDS, ChainRunner
from ..estimators.base import grad_or_zeros
from .estimators import flat_all_reduce, shard_estimator
from .group import Comm, DistributedError
from .sharding import local_positions, shard_range

__all__ = ["DataParallelRunner"]


class DataParallelRunner(ChainRunner):
    """Runs (or resumes) chain ``chain`` on this rank's shard of the data, in step with the other ranks."""

    def __init__(self, spec: dict[str, Any], chain: int, comm: Comm):
        super().__init__(spec, chain)
        self.comm = comm
        # tensors, a map-style dataset or a Shard (the driver refuses iterables): the batch indices alone from the
        # chain's stream, and only this rank's examples fetched
        self.indices, self.fetch = self.stream.stream, self.stream.fetch
        self.rows = shard_range(self.num_data, comm.world_size, comm.rank)
        directory = Path(spec["directory"])
        self.ckpt_path = directory / f"chain_{chain}.rank{comm.rank}.pt"
        self.prev_path = directory / f"chain_{chain}.rank{comm.rank}.prev.pt"
        sampler = self.sampler
        if self.closure_sampler:
            self.reducer = "closure"
        else:
            for group in sampler.param_groups:
                if group.get("beta") == "auto":
                    raise ValueError("data_parallel=True does not support SGHMC(beta='auto'): its estimate of the "
                                     "gradient noise needs every example of the batch on one rank; give beta a number")
            self.reducer = shard_estimator(sampler.estimator, self.rows, comm)
            # noise_ratio needs the per-example gradients of the whole batch: NaN here (no effect on the chain)
            sampler.noise_ratio_every = 0
        self.params = [p for g in sampler.param_groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("the sampler has no trainable parameters")

    # -- the closure ----------------------------------------------------------------------------------

    def _reduced_closure(self, batch: tuple | None, local: int, total: int) -> Any:
        """Zero, this rank's loss and backward, then (unless the estimator does it) the all-reduce of the weighted
        gradients and loss: afterwards ``.grad`` and the returned loss are the global batch's, as one process
        computes them (mean reduction: weights b_r/B; sum: 1)."""
        sampler, model, loss_fn = self.sampler, self.model, self.spec["loss_fn"]
        weight = (local / total) if sampler_reduction(sampler) == "mean" else 1.0
        estimator = getattr(sampler, "estimator", None)

        def closure():
            sampler.zero_grad()
            if local:
                out = loss_fn(model, batch)
                if not isinstance(out, torch.Tensor) or out.numel() != 1:
                    raise TypeError("loss_fn(model, batch) must return the batch mean NLL as a one-element tensor")
                out.backward()
                mine = out.detach().reshape(())
            else:  # none of the batch's examples is on this rank
                mine = torch.zeros((), dtype=self.params[0].dtype, device=self.params[0].device)
            grads = [grad_or_zeros(p) for p in self.params]
            if self.reducer == "estimator":  # SAGA all-reduces its estimate, the loss with it
                estimator.pending_loss = mine * weight
                estimator.loss_slot = torch.zeros_like(mine)
                return estimator.loss_slot
            reduced = flat_all_reduce(self.comm, [g * weight for g in grads] + [mine * weight],
                                      "the all-reduce of the batch gradient")
            for p, g in zip(self.params, reduced):
                p.grad = g
            return reduced[-1]

        return closure

    # -- one step -----------------------------------------------------------------------------------

    def full_closure(self) -> torch.Tensor:
        """The closure samplers' full-data loss: this rank's shard, all-reduced (weights n_r/N)."""
        if self._full is None:
            self._full = self._reduced_closure(self.full_batch, len(self.rows), self.num_data)
        return self._full()

    def advance(self) -> None:
        sampler = self.sampler
        if self.closure_sampler:
            sampler.step(self.full_closure)
        else:
            idx = self.indices.next()
            local = local_positions(idx, self.rows)
            batch = self.fetch(local + self.rows.start) if local.numel() else None
            closure = self._reduced_closure(batch, int(local.numel()), int(idx.numel()))
            if getattr(getattr(sampler, "estimator", None), "needs_closure", False):
                sampler.step(closure, indices=idx)
            else:
                sampler.step(indices=idx, loss=closure())
        self.grad_evals += float(sampler.stats.get("grad_evals", float("nan")))

    def keep(self) -> None:
        if self.comm.rank == 0:  # the draws are the same on every rank: rank 0 records them
            super().keep()

    # -- checkpoints ----------------------------------------------------------------------------------

    def flush_and_checkpoint(self) -> None:
        self.check_in_step()
        if self.spec["persistent"] and self.ckpt_path.exists():
            os.replace(self.ckpt_path, self.prev_path)  # the previous one is kept until this one is written
        super().flush_and_checkpoint()

    def check_in_step(self) -> None:
        """Refuses parameters that differ across ranks (a random forward pass such as dropout, which draws different
        numbers on each shard, or a model_fn that depends on the rank): the chain would no longer be one chain."""
        with torch.no_grad():
            mine = torch.stack([p.detach().double().sum() for p in self.params]).cpu().tolist()
        every = self.comm.all_gather_object(mine, "comparing the ranks' parameters")
        differ = [r for r, v in enumerate(every) if v != every[0]]
        if differ:
            raise DistributedError(
                f"data_parallel: after step {self.step} of chain {self.chain} the parameters of rank(s) {differ} "
                "differ from rank 0's. Every rank must make the same update: a model whose forward pass draws random "
                "numbers (dropout, vr_mcmc.rad) draws them differently on each shard, and so does a model_fn or "
                "sampler_fn that depends on the rank. Pass the sampler a generator= and remove the randomness from "
                "the forward pass")

    def resume(self) -> None:
        """Resumes every rank from the latest step that all ranks have a checkpoint of (this or the previous one)."""
        saved = {}
        if self.spec["persistent"]:
            for path in (self.ckpt_path, self.prev_path):
                if path.exists():
                    saved[int(load_checkpoint(path)["step"])] = path
        every = self.comm.all_gather_object(sorted(saved), f"agreeing on where chain {self.chain} resumes")
        common = set.intersection(*(set(s) for s in every)) if every else set()
        step = max(common, default=0)
        if step:
            self.restore(load_checkpoint(saved[step]))
            if saved[step] == self.prev_path:  # the newer one is a step the other ranks never reached
                os.replace(self.prev_path, self.ckpt_path)
        if self.comm.rank == 0:
            from ..chains.blocks import verify_blocks

            verify_blocks(self.ckpt_path.parent, self.chain, self.index)
            for kind in KINDS:
                self.files[kind].drop_from(self.blocks[kind])
        self.check_in_step()

    def run(self) -> dict[str, Any]:
        self._full = None
        if self.closure_sampler:
            self.full_batch = self.fetch(torch.arange(self.rows.start, self.rows.stop))
        return super().run()


def sampler_reduction(sampler: Any) -> str:
    return getattr(sampler, "loss_reduction", "mean")
