"""Vectorized chains (``chain_method="vectorized"``, DESIGN.md §13): C chains whose losses and gradients are one
batched computation (`batched.BatchedGradients`), each otherwise the chain a sequential run makes.

Each chain is built, seeded, resumed and checkpointed exactly as in a sequential run (a `runner.ChainRunner` per
chain: its model, sampler, batch stream, draw blocks and checkpoint file). The chains' parameters are then moved
into stacked tensors with a leading chain dimension, each chain's ``nn.Parameter`` (and buffer) becoming a view of
its slice, so the batched forward reads them without a copy and each sampler's in-place update writes into them. Per
step: every chain draws its own batch from its own stream, one vmapped computation gives every chain's loss, batch
gradient (written into that chain's ``.grad``) and, for estimators that use them (SAGA's table, the ``noise_ratio``
diagnostic), its per-example gradients, stacked; then SGLD, SAGA-LD, SGHMC, pSGLD and SGNHT chains with a minibatch
or SAGA estimate update all chains in one stacked step (`torch_sample.vectorized`, SAGA's tables stacked by
`vr_mcmc.estimators.stacked_saga`), each chain drawing its noise from the torch RNG state that chain would have in
a sequential run (swapped in and out), so chain c draws the same noise as sequential chain c; other SG chains step
per chain on their slices of the batched results, served to their estimators by an `_EngineView`. Samplers with
closures (ULA, MALA, HMC, NUTS on the full data; SVRG-LD / SGLD-CV at θ and at the centre, on each chain's batch)
run each chain's own ``step`` in a thread of its own (`lockstep`), every closure call evaluated with the other
chains' in one batched computation. ``vectorized_compile`` runs the batched computations through torch.compile
(`batched.CompiledOnce`). With ``max_vectorized=k`` groups of at most k chains run one after another.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import torch

from torch_sample.vectorized import STACKS
from torch_sample.vectorized import fits as stack_fits

from ..estimators.stacked_noise import minibatch_variance
from ..estimators.stacked_saga import StackedSAGA
from ..estimators.stacked_saga import fits as saga_fits
from .batched import BatchedGradients, VectorizeError
from .lockstep import ChainThread
from .runner import ChainRunner, _postfix, _progress
from .stream import TensorBatches

__all__ = ["COMPILE_MIN_CLOSURE_STEPS", "COMPILE_MIN_STEPS", "VectorizeError", "check_vectorizable", "run_vectorized"]

# Runs of at least this many steps per chain compile their batched computations by default (benchmarks/RESULTS.md,
# "Vectorized chains"; demo MLP, one thread): a compilation costs 0.2-0.8 s with inductor's on-disk cache warm and
# 4-7 s cold (the first of a process, or a new graph); it saves ~0.5 ms a step of an SG sampler (16 chains: 2.8 ->
# 2.2 ms for SGLD) and 2-8 ms a full-data evaluation (16 chains: 14.5 -> 6.8 ms), of which HMC makes ~8 a step.
COMPILE_MIN_STEPS = 5000
COMPILE_MIN_CLOSURE_STEPS = 500  # ULA/MALA/HMC/NUTS: one or more full-data evaluations a step

SEQUENTIAL = 'run these chains with chain_method="sequential" (or "parallel")'


class _EngineView:
    """What an estimator reads of its per-example engine (`vr_mcmc.per_example.PerExampleGradients`), served from
    the batched computation of the current step: ``collect()``, ``batch_gradients()``, ``parameter_names``."""

    check = False  # the representations are exact by construction (torch.func), no consistency probes needed

    def __init__(self, parameter_names: Mapping[str, torch.nn.Parameter], loss_reduction: str):
        self.parameter_names = dict(parameter_names)
        self.loss_reduction = loss_reduction
        self.reps: dict[str, Any] | None = None
        self.grads: dict[str, torch.Tensor] = {}

    def collect(self, check: bool = False) -> dict[str, Any]:
        from ..per_example import PerExampleError

        if self.reps is None:
            raise PerExampleError("no per-example gradients for this step (vectorized chains)")
        return dict(self.reps)

    def batch_gradients(self) -> dict[str, torch.Tensor]:
        return dict(self.grads)


class _VectorChainRunner(ChainRunner):
    """A chain of a vectorized group: its checkpoint clones the model's tensors and its sampler's state tensors
    (views of the stacked parameters and states, which torch.save would otherwise write whole)."""

    def __init__(self, spec: dict[str, Any], chain: int):
        super().__init__(spec, chain)
        state_dict = self.sampler.state_dict
        self.sampler.state_dict = lambda: _own_tensors(state_dict())  # this chain's object only

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def _own_tensors(obj: Any) -> Any:
    """``obj`` (a state dict) with every tensor that is a view of a larger one cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj._base is not None else obj
    if isinstance(obj, dict):
        return {k: _own_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_own_tensors(v) for v in obj)
    return obj


def check_vectorizable(sampler: Any) -> None:
    """Refuses, before any draw, a sampler the vectorized driver cannot run."""
    table = getattr(getattr(sampler, "estimator", None), "table", None)
    if getattr(table, "partition", None) is not None:
        raise VectorizeError("chain_method='vectorized' does not run partitioned gradient tables (block_size=k): the "
                             f"chains' block batches may differ in size; {SEQUENTIAL}")


def run_vectorized(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs (or resumes) every chain of ``spec`` in groups of at most ``spec['max_vectorized']``; their summaries."""
    size = spec.get("max_vectorized") or spec["num_chains"]
    chains = list(range(spec["num_chains"]))
    summaries: list[dict[str, Any]] = []
    for start in range(0, len(chains), size):
        summaries += VectorizedGroup(spec, chains[start : start + size]).run()
    return summaries


class VectorizedGroup:
    """Chains ``chains`` of the run ``spec``, stepped together."""

    def __init__(self, spec: dict[str, Any], chains: list[int]):
        self.spec, self.chains = spec, chains
        self.runners: list[ChainRunner] = []
        self.rng: list[torch.Tensor] = []  # each chain's torch RNG state between its steps
        for c in chains:
            runner = _VectorChainRunner(spec, c)  # seeds the global RNG with the chain's seed, as sequential
            check_vectorizable(runner.sampler)
            runner.resume()  # restores the chain's RNG state if it has a checkpoint
            self.runners.append(runner)
            self.rng.append(torch.get_rng_state())
        first = self.runners[0]
        self.names = [n for n, p in first.model.named_parameters() if p.requires_grad]
        # each chain's trainable parameters in that order (its .grad is set from the batched results)
        self.chain_params = [[dict(r.model.named_parameters())[n] for n in self.names] for r in self.runners]
        with torch.random.fork_rng(devices=[]):
            template = spec["model_fn"]()  # a clean copy (no engine hooks) whose parameters functional_call swaps
        compile = spec.get("vectorized_compile")
        if compile is None:  # by the run's length, not what is left of it: a resumed run computes as it began
            compile = first.total >= (COMPILE_MIN_CLOSURE_STEPS if first.closure_sampler else COMPILE_MIN_STEPS)
        nominal = getattr(getattr(first.stream, "stream", None), "batch_size", None)  # tensor data's batch size
        self.gradients = BatchedGradients(template, spec["loss_fn"], self.names,
                                          getattr(first.sampler, "loss_reduction", "mean"), compile=compile,
                                          batch_size=nominal)
        self._check_resumed_tables()
        self.trainable, self.fixed = self._stack()
        self._check_loss_reduction(template)
        self.closure_sampler = first.closure_sampler
        # SVRG-LD / SGLD-CV (closures at θ and at the centre): each chain's own step in its thread, its closures
        # evaluated in lockstep with the others' (as the closure samplers'), on its own batch
        self.lockstep_sg = not self.closure_sampler and all(
            getattr(getattr(r.sampler, "estimator", None), "needs_closure", False) for r in self.runners)
        self.views: list[_EngineView | None] = [self._attach_view(r) for r in self.runners]
        data = spec["data"]
        self.tensor_data = isinstance(first.stream, TensorBatches) and (isinstance(data, torch.Tensor) or (
            isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data)))
        # SG diffusions with a minibatch or SAGA estimate: one stacked update (torch_sample.vectorized) instead of
        # C sampler steps
        kinds = {(type(r.sampler), stack_fits(r.sampler)) for r in self.runners}
        kind = kinds.pop() if len(kinds) == 1 else (None, None)
        self.fast = kind[1]
        self.stacked_saga: StackedSAGA | None = None
        if self.fast:
            index = {id(p): n for n, p in first.model.named_parameters()}
            self.order = [index[id(p)] for p in first.sampler.param_groups[0]["params"]]
            self.stack = STACKS[kind[0]]([r.sampler for r in self.runners], [self.trainable[n] for n in self.order])
        self.threads: list[ChainThread] = []
        if self.closure_sampler:  # every chain's closure sees all the data: one batch, shared by the chains
            self.full_batch = first.stream.full_batch()
        if self.closure_sampler or self.lockstep_sg:
            self.threads = [ChainThread(f"vr_mcmc chain {c}") for c in chains]

    def _check_resumed_tables(self) -> None:
        """A gradient table resumed from a sequential checkpoint may hold factored rows (the engine's form for
        Linear layers); the batched pass gives those only when every trainable parameter is in a Linear layer, and
        dense per-example gradients otherwise, which such a table cannot take."""
        if self.gradients.factored:
            return
        from ..storage.stores import FactoredStore

        for runner in self.runners:
            table = getattr(getattr(runner.sampler, "estimator", None), "table", None)
            factored = [n for n, store in getattr(table, "stores", {}).items() if isinstance(store, FactoredStore)]
            if factored:
                raise VectorizeError(
                    f"chain {runner.chain} resumes a gradient table whose rows of {factored[0]!r} are stored factored "
                    "(as a sequential run stores Linear layers), but this model's vectorized pass gives dense "
                    "per-example gradients (not every trainable parameter is in a Linear layer): resume this run "
                    "with chain_method='sequential', or start the vectorized run in a new checkpoint directory")

    def _check_loss_reduction(self, template: torch.nn.Module) -> None:
        """The SG samplers' warning for a loss that is a batch sum reads the loss's autograd node, which the batched
        pass hides: one plain forward of the template (no hooks; no RNG used) on chain 0's first batch shows it."""
        sampler = self.runners[0].sampler
        if not hasattr(sampler, "_check_loss_reduction") or getattr(sampler, "_loss_checked", True):
            return
        stream = self.runners[0].stream
        state = stream.state_dict()
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            _, batch = stream.next()
            loss = self.spec["loss_fn"](template, batch)
        stream.load_state_dict(state)  # the chain draws this batch again
        sampler._check_loss_reduction(loss)
        for runner in self.runners:  # one warning for the run, as for a sequential chain
            runner.sampler._loss_checked = True

    def _stack(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Moves the chains' parameters into [C, ...] tensors; each chain's parameter becomes a view of its slice."""
        trainable, fixed = {}, {}
        params = [dict(r.model.named_parameters()) for r in self.runners]
        for name, p in params[0].items():
            stacked = torch.stack([ps[name].detach() for ps in params])
            for k, ps in enumerate(params):
                ps[name].data = stacked[k]
            (trainable if p.requires_grad else fixed)[name] = stacked
        # buffers too: an in-place update in the batched forward (BatchNorm's running statistics) reaches each chain
        buffers = [dict(r.model.named_buffers()) for r in self.runners]
        for name in buffers[0]:
            stacked = torch.stack([bs[name] for bs in buffers])
            for k, bs in enumerate(buffers):
                bs[name].data = stacked[k]
            fixed[name] = stacked
        return trainable, fixed

    def _attach_view(self, runner: ChainRunner) -> _EngineView | None:
        """Gives the chain's estimator per-example gradients from the batched computation, where it uses them."""
        estimator = getattr(runner.sampler, "estimator", None)
        engine = getattr(estimator, "engine", None)
        if engine is None or (estimator.needs_closure and not self.lockstep_sg):  # their own model runs: keep it
            return None
        view = _EngineView(engine.parameter_names, runner.sampler.loss_reduction)
        estimator.engine = view
        return view

    # -- one step --------------------------------------------------------------------------------------------

    def _batches(self, active: list[int]) -> tuple[list[torch.Tensor | None], tuple]:
        """Each active chain's next batch indices (its own stream); the chains' batches stacked [C, B, ...] (an
        inactive chain, one already further on after a resume, computes on an active one's batch, unused)."""
        indices: list[torch.Tensor | None] = [None] * len(self.runners)
        if self.tensor_data:  # the indices from each chain's stream, then one gather of [C, B] indices
            for k in active:
                indices[k] = self.runners[k].stream.stream.next()
            fill = indices[active[0]]
            return indices, self.runners[0].stream.fetch(torch.stack([i if i is not None else fill for i in indices]))
        parts: list[tuple | None] = [None] * len(self.runners)
        for k in active:
            indices[k], parts[k] = self.runners[k].stream.next()
        fill = parts[active[0]]
        return indices, tuple(torch.stack(ts) for ts in zip(*[p if p is not None else fill for p in parts]))

    def _per_example(self, active: list[int]) -> bool:
        """Whether an active chain's estimator reads per-example gradients this step: a table (SAGA) always, the
        ``noise_ratio`` diagnostic on the steps its sampler measures it (``noise_ratio_every``)."""
        for k in active:
            if self.views[k] is None:
                continue
            sampler = self.runners[k].sampler
            every = getattr(sampler, "noise_ratio_every", 1)
            if hasattr(sampler.estimator, "table") or (every and sampler._steps % every == 0):
                return True
        return False

    def _compute(self, batch: tuple, per_example: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list | None]:
        try:
            with torch.enable_grad():
                return self.gradients.compute(self.trainable, self.fixed, batch, per_example)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            if isinstance(exc, VectorizeError):
                raise
            raise VectorizeError(_why(exc)) from exc

    def _fast_ready(self) -> bool:
        """Minibatch estimates: when the diffusion's states agree; SAGA: also once every table is allocated (at its
        first update, made by the chains' own steps) and stacked, and the tables are at the same update count."""
        if not self.stack.ready():
            return False
        if self.fast != "saga":
            return True
        if self.stacked_saga is None:
            estimators = [r.sampler.estimator for r in self.runners]
            if not all(saga_fits(e) for e in estimators):
                return False
            self.stacked_saga = StackedSAGA(estimators)
        return self.stacked_saga.in_step()

    def advance(self, active: list[int]) -> None:
        if self.closure_sampler:
            self._advance_closure(active)
            return
        indices, batch = self._batches(active)
        if self.lockstep_sg:
            return self._advance_closure(active, batch, indices)
        closures = [getattr(self.runners[k].sampler.estimator, "needs_closure", False) for k in active]
        if all(closures):  # SVRG-LD / SGLD-CV among other chains: each evaluates its own closure (below)
            return self._step_each(active, indices, batch, None, None, None)
        loss, grads, reps = self._compute(batch, self._per_example(active))
        if self.fast and len(active) == len(self.runners) and self._fast_ready():
            samplers = [r.sampler for r in self.runners]
            commit, noise_var = None, None
            diagnose = reps is not None and any(self.stack.diagnosed())
            if self.fast == "saga":
                v = self.stacked_saga.estimate(torch.stack(indices), grads, reps, diagnose)
                est, commit = [v[n] for n in self.order], self.stacked_saga.commit
                if diagnose:  # its columns in the samplers' parameter order
                    where = {n: j for j, n in enumerate(self.stacked_saga.names)}
                    noise_var = self.stacked_saga.noise_var[:, [where[n] for n in self.order]]
            else:
                est = [grads[n].mul(samplers[0].num_data) for n in self.order]  # Minibatch: N·∇(batch mean)
                if diagnose:
                    noise_var = minibatch_variance(reps, self.order, grads, int(indices[0].numel()),
                                                   samplers[0].num_data)
            made = self.stack.step(est, loss.detach(), int(indices[0].numel()), self.rng, commit, noise_var)
            if made:
                for r in self.runners:
                    r.grad_evals += float(r.sampler.stats["grad_evals"])
                return
        self._step_each(active, indices, batch, loss, grads, reps)

    def _step_each(self, active: list[int], indices: list, batch: tuple, loss: torch.Tensor | None,
                   grads: Mapping[str, torch.Tensor] | None, reps: list | None) -> None:
        """Each active chain's own ``sampler.step`` on its slice of the batched results (with its RNG state)."""
        for k in active:
            runner = self.runners[k]
            if grads is not None:
                for n, p in zip(self.names, self.chain_params[k]):
                    p.grad = grads[n][k]
            view = self.views[k]
            if view is not None:
                view.reps = None if reps is None else reps.chain(k)
                view.grads = {} if grads is None else {n: grads[n][k] for n in self.names}
            torch.set_rng_state(self.rng[k])
            sampler, idx = runner.sampler, indices[k]
            if getattr(getattr(sampler, "estimator", None), "needs_closure", False):
                # SVRG-LD / SGLD-CV: the chain's own closure (its engine reads that pass's hooks), as sequential
                sampler.step(runner.batch_closure(tuple(t[k] for t in batch)), indices=idx)
            else:
                sampler.step(indices=idx, loss=loss[k].detach())
            self.rng[k] = torch.get_rng_state()
            runner.grad_evals += float(sampler.stats.get("grad_evals", float("nan")))

    def _advance_closure(self, active: list[int], batch: tuple | None = None, indices: list | None = None) -> None:
        """One step of closure samplers (ULA, MALA, HMC, NUTS; ``batch`` None: the full data, shared) or of SG
        samplers with closure estimators (SVRG-LD, SGLD-CV; ``batch``: the chains' own batches [C, B, ...], and
        ``indices``): each chain's own step in its thread (`lockstep`); each round evaluates every chain parked
        in its closure with one batched computation (with per-example gradients on the steps whose noise
        diagnostic reads them, served to the chains' estimators by their `_EngineView`)."""
        shared = batch is None
        per_example = not shared and self._per_example(active)  # decided before the steps count themselves
        if shared:
            batch = self.full_batch
        state: dict[int, str] = {}
        for k in active:
            runner, thread = self.runners[k], self.threads[k]
            torch.set_rng_state(self.rng[k])
            state[k] = thread.start(_step_work(runner.sampler, thread, None if shared else indices[k]))
            self.rng[k] = torch.get_rng_state()
        while True:
            waiting = [k for k in active if state[k] == "eval"]
            if not waiting:
                break
            try:
                with torch.enable_grad():
                    loss, grads, reps = self.gradients.compute(self.trainable, self.fixed, batch, per_example,
                                                               shared=shared)
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                if isinstance(exc, VectorizeError):
                    raise
                raise VectorizeError(_why(exc)) from exc
            for k in waiting:
                for n, p in zip(self.names, self.chain_params[k]):
                    p.grad = grads[n][k]
                view = self.views[k]
                if view is not None:
                    view.reps = None if reps is None else reps.chain(k)
                    view.grads = {n: grads[n][k] for n in self.names}
                torch.set_rng_state(self.rng[k])
                state[k] = self.threads[k].answer(loss[k].detach())
                self.rng[k] = torch.get_rng_state()
        for k in active:
            self.runners[k].grad_evals += float(self.runners[k].sampler.stats.get("grad_evals", float("nan")))

    # -- the group ---------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        spec = self.spec
        num_warmup, total, every = spec["num_warmup"], self.runners[0].total, spec["checkpoint_every"]
        bar = _progress(spec, self.chains[0], total, min(r.step for r in self.runners))
        # ULA has no acceptance rate to adapt its step size to
        adapting = self.closure_sampler and num_warmup > 0 and self.runners[0].sampler.adapts_step_size
        for k, r in enumerate(self.runners):
            r.start_time = time.perf_counter()
            if r.step == 0 and adapting:
                torch.set_rng_state(self.rng[k])
                r.sampler.adapt(True, num_warmup=num_warmup)
                self.rng[k] = torch.get_rng_state()
        try:
            while True:
                pending = [r.step for r in self.runners if r.step < total]
                if not pending:
                    break
                now = min(pending)
                active = [k for k, r in enumerate(self.runners) if r.step == now]
                self.advance(active)
                for k in active:
                    runner = self.runners[k]
                    runner.step += 1
                    step = runner.step
                    if adapting and step == num_warmup:
                        torch.set_rng_state(self.rng[k])
                        runner.sampler.adapt(False)
                        self.rng[k] = torch.get_rng_state()
                    runner.keep()
                    if step % (every * runner.thin) == 0 or step == total or (step == num_warmup and num_warmup > 0):
                        torch.set_rng_state(self.rng[k])  # the checkpoint saves the chain's own RNG state
                        runner.flush_and_checkpoint()
                if bar is not None:
                    bar.update(1)
                    if (now + 1) % 20 == 0:
                        bar.set_postfix_str(_postfix(self.runners[0].sampler.stats), refresh=False)
        except BaseException:
            for runner in self.runners:  # keep the draws made since the last block (for the partial result)
                with contextlib.suppress(Exception):
                    runner.flush()
            raise
        finally:
            for runner in self.runners:
                with contextlib.suppress(Exception):
                    runner.stream.close()  # a DataLoader's worker processes
            for thread in self.threads:
                with contextlib.suppress(Exception):
                    thread.close()
            if bar is not None:
                bar.close()
        return [{"chain": r.chain, "elapsed": r.elapsed + time.perf_counter() - r.start_time, "index": r.index,
                 "params": None if r.param_files is None else r.param_files.index} for r in self.runners]


def _step_work(sampler: Any, thread: ChainThread, indices: torch.Tensor | None) -> Any:
    """One step of ``sampler`` with the thread's closure (and the batch's ``indices``: SG samplers)."""
    if indices is None:
        return lambda: sampler.step(thread.closure)
    return lambda: sampler.step(thread.closure, indices=indices)


def _why(exc: BaseException) -> str:
    """The vectorized driver's error for a model or loss that torch.vmap cannot batch, naming the likely cause."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "data-dependent control flow" in low or "is_nonzero" in low or "item()" in low or ".item" in low:
        cause = "data-dependent Python control flow (an `if` or `.item()` on a tensor's value) in the model or loss"
    elif "inplace" in low or "in-place" in low or "in place" in low or "match the broadcast shape" in low:
        # (the last: an in-place op of a batched value into an unbatched tensor, as vmap's forward reports it)
        cause = ("an in-place update of a buffer or parameter in the forward (e.g. BatchNorm in training mode "
                 "updating its running statistics)")
    elif "random" in low:
        cause = "random operations in the forward (e.g. dropout in training mode)"
    else:
        cause = "an operation torch.vmap cannot batch"
    return (f"chain_method='vectorized' cannot run this model and loss as one batched computation over the chains: "
            f"{cause} ({text.splitlines()[0]}); {SEQUENTIAL}")

