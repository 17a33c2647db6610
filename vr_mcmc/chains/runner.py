"""One chain: build (or resume) its model and sampler, step, record every kept draw, flush blocks and checkpoints."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..recorder import Recorder
from .blocks import ChainBlocks, verify_blocks, write_block
from .checkpoint import load_checkpoint, save_atomic
from .loader import batch_source
from .params import ChainParams
from .stream import chain_seeds

__all__ = ["ChainRunner", "LineProgress", "run_chain"]

KINDS = ("warmup", "draws")


def is_closure_sampler(sampler: Any) -> bool:
    from torch_sample.closure import ClosureSampler

    return isinstance(sampler, ClosureSampler)


def build(spec: dict[str, Any], chain: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The chain's model and sampler, seeded by ``torch.manual_seed(chain_seeds(seed, chain)[0])``."""
    torch.manual_seed(chain_seeds(spec["seed"], chain)[0])
    model = spec["model_fn"]()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fn() must return a torch.nn.Module, got {type(model).__name__}")
    sampler = spec["sampler_fn"](model)
    if not isinstance(sampler, torch.optim.Optimizer):
        raise TypeError(f"sampler_fn(model) must return a torch_sample sampler, got {type(sampler).__name__}")
    return model, sampler


class ChainRunner:
    """Runs (or resumes) chain ``chain`` of the run ``spec``, writing its draws to ``spec['directory']``."""

    def __init__(self, spec: dict[str, Any], chain: int):
        self.spec, self.chain = spec, chain
        directory = Path(spec["directory"])
        self.ckpt_path = directory / f"chain_{chain}.pt"
        self.files = {"warmup": ChainBlocks(directory, chain, warmup=True), "draws": ChainBlocks(directory, chain)}
        self.model, self.sampler = build(spec, chain)
        self.recorder = Recorder(spec["record"], spec["log_likelihood"])
        # the chain's batches (tensors, a dataset, a DataLoader): next() -> (indices, batch); resumable state
        self.stream = batch_source(spec["data"], self.sampler, spec["batch_size"], chain_seeds(spec["seed"], chain)[1])
        self.num_data = self.stream.num_data
        self.closure_sampler = is_closure_sampler(self.sampler)
        self.num_warmup, self.thin = spec["num_warmup"], spec["thin"]
        self.total = self.num_warmup + spec["num_samples"]
        self.step, self.blocks, self.elapsed = 0, {"warmup": 0, "draws": 0}, 0.0
        self.grad_evals = 0.0  # per-example gradients computed so far, warmup included (-> data_passes)
        self.index: dict[str, list[dict[str, Any]]] = {"warmup": [], "draws": []}  # the blocks written, checksummed
        self.buffers: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {"warmup": {}, "draws": {}}
        self.full_batch: tuple | None = None
        keep_params = spec.get("keep_params")  # every k-th draw's state dict to disk (params.py)
        self.param_files = ChainParams(directory, chain, keep_params) if keep_params else None
        self.start_time = time.perf_counter()

    # -- state --------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Loads the chain's last checkpoint, if any, and drops the blocks written after it."""
        state = None
        if self.ckpt_path.exists():
            state = load_checkpoint(self.ckpt_path)
            self.restore(state)
            verify_blocks(self.ckpt_path.parent, self.chain, self.index)
        for kind in KINDS:
            self.files[kind].drop_from(self.blocks[kind])
        if self.param_files is not None:
            self.param_files.resume(None if state is None else state.get("params"))

    def restore(self, state: Mapping[str, Any]) -> None:
        """Puts the chain where checkpoint ``state`` left it: model, sampler, torch's RNG, the batch stream and the
        counters (steps, blocks, time, gradient evaluations, the block index)."""
        self.model.load_state_dict(state["model"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.stream.load_state_dict(state["stream"])
        self.step, self.blocks, self.elapsed = state["step"], state["blocks"], state.get("elapsed", 0.0)
        self.grad_evals = state.get("grad_evals", 0.0)
        self.index = state["index"]

    def flush(self) -> None:
        """Writes the buffered draws as blocks."""
        for kind in KINDS:
            if self.buffers[kind]:
                entry = write_block(self.files[kind].path(self.blocks[kind]), self.buffers[kind])
                self.index[kind].append(entry)
                self.blocks[kind] += 1
                self.buffers[kind] = {}

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def flush_and_checkpoint(self) -> None:
        self.flush()
        if self.spec["persistent"]:
            size = self.ckpt_path.stat().st_size if self.ckpt_path.exists() else 0
            needed = max(2 * size, 4 * sum(p.numel() * p.element_size() for p in self.model.parameters())) + 2**16
            save_atomic({"step": self.step, "blocks": dict(self.blocks), "model": self.model_state(),
                         "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                         "stream": self.stream.state_dict(), "index": self.index, "grad_evals": self.grad_evals,
                         "params": None if self.param_files is None else self.param_files.state_dict(),
                         "elapsed": self.elapsed + time.perf_counter() - self.start_time},
                        self.ckpt_path, needed)

    # -- one step -----------------------------------------------------------------------------------

    def full_closure(self) -> torch.Tensor:
        self.sampler.zero_grad()
        loss = self.spec["loss_fn"](self.model, self.full_batch)
        loss.backward()
        return loss

    def batch_closure(self, batch: tuple) -> Any:
        """As torch.optim.LBFGS's closure: zero, loss, backward."""
        sampler, model, loss_fn = self.sampler, self.model, self.spec["loss_fn"]

        def closure():
            sampler.zero_grad()
            out = loss_fn(model, batch)
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise TypeError("loss_fn(model, batch) must return the batch mean NLL as a one-element tensor")
            out.backward()
            return out

        return closure

    def advance(self) -> None:
        """One sampler step."""
        sampler = self.sampler
        if self.closure_sampler:
            sampler.step(self.full_closure)
        else:
            idx, batch = self.stream.next()
            closure = self.batch_closure(batch)
            if getattr(getattr(sampler, "estimator", None), "needs_closure", False):
                sampler.step(closure, indices=idx)  # it calls the closure at θ, and again at its centre
            else:
                loss = closure()
                sampler.step(indices=idx, loss=loss)  # attached: the sampler checks its reduction once
        self.grad_evals += float(sampler.stats.get("grad_evals", float("nan")))

    def keep(self) -> None:
        """Buffers the draw at ``self.step`` if it is kept (thinning; warmup with ``save_warmup``)."""
        step, num_warmup = self.step, self.num_warmup
        in_warmup = step <= num_warmup
        kept = (step - (0 if in_warmup else num_warmup)) % self.thin == 0
        # a schedule's exploration phase (torch_sample.schedules.Cyclical: T = 0) makes no draws
        kept = kept and self.sampler.stats.get("sampling_phase", 1.0) != 0
        if kept and (not in_warmup or self.spec["save_warmup"]):
            kind = "warmup" if in_warmup else "draws"
            draw = self.recorder.values(self.model, self.sampler)
            if self.param_files is not None and kind == "draws":
                self.param_files.offer(self.model)
            # the driver counts data passes; a sampler that reports its own keeps them (no double count)
            draw["sample_stats"].setdefault("data_passes", np.asarray(self.grad_evals / self.num_data))
            for group, values in draw.items():
                for name, value in values.items():
                    self.buffers[kind].setdefault(group, {}).setdefault(name, []).append(value)

    # -- the chain ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Runs the chain to its end; returns its summary."""
        self.resume()
        num_warmup, total = self.num_warmup, self.total
        # ULA has no acceptance rate to adapt its step size to
        adapting = self.closure_sampler and num_warmup > 0 and self.sampler.adapts_step_size
        if self.step == 0 and adapting:
            self.sampler.adapt(True, num_warmup=num_warmup)
        if self.closure_sampler and self.full_batch is None:  # (a data-parallel runner sets its shard's)
            self.full_batch = self.stream.full_batch()
        every = self.spec["checkpoint_every"]
        bar = _progress(self.spec, self.chain, total, self.step)
        self.start_time = time.perf_counter()
        try:
            while self.step < total:
                self.advance()
                self.step += 1
                step = self.step
                if adapting and step == num_warmup:
                    self.sampler.adapt(False)
                self.keep()
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0:
                        bar.set_postfix_str(_postfix(self.sampler.stats), refresh=False)
                if step % (every * self.thin) == 0 or step == total or (step == num_warmup and num_warmup > 0):
                    self.flush_and_checkpoint()
        except BaseException:
            # keep the draws made since the last block (for the partial result); a resume drops them,
            # since they lie after the last checkpoint, and makes them again
            with contextlib.suppress(Exception):
                self.flush()
            raise
        finally:
            self.stream.close()  # a DataLoader's worker processes
            if bar is not None:
                bar.close()
        return {"chain": self.chain, "elapsed": self.elapsed + time.perf_counter() - self.start_time,
                "index": self.index, "params": None if self.param_files is None else self.param_files.index}


def run_chain(spec: dict[str, Any], chain: int) -> dict[str, Any]:
    """Runs (or resumes) one chain, writing its draws to ``spec['directory']``; returns its summary.
    A module-level function, so that worker processes can be given it."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return ChainRunner(spec, chain).run()


def _postfix(stats: Mapping[str, float]) -> str:
    if "acceptance_rate" in stats:
        return f"accept {stats['acceptance_rate']:.2f}, step size {stats.get('step_size', float('nan')):.3g}"
    return f"step size {stats.get('step_size', float('nan')):.3g}"


MIN_BAR_COLUMNS = 40  # narrower terminals (or a zero-width one) get progress lines: a tqdm bar would wrap


class LineProgress:
    """Progress as plain lines on stderr, for a log file, a notebook, a batch job or a narrow terminal: one line
    each time the chain passes another 10% of its steps or ``every_s`` seconds after the last line, whichever
    comes first (at most one per ``min_gap_s``), and one at the end: steps done, the phase, steps per second,
    the step size (and acceptance), the time left. The interface is the subset of tqdm's the runner uses."""

    every_s = 10.0
    min_gap_s = 1.0

    def __init__(self, chain: int, total: int, done: int, stream: Any = None, clock: Any = time.perf_counter):
        self.chain, self.total, self.n, self.start_n, self.clock = chain, total, done, done, clock
        self.num_warmup, self.thin, self.written = 0, 1, done
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = clock()
        self.next_tenth = done * 10 // max(total, 1) + 1
        self.postfix = ""

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        tenth = self.n * 10 // max(self.total, 1)
        if now - self.last >= self.min_gap_s and (tenth >= self.next_tenth or now - self.last >= self.every_s):
            self.write(now)
        if tenth >= self.next_tenth:
            self.next_tenth = tenth + 1

    def write(self, now: float) -> None:
        self.last, self.written = now, self.n
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else float("nan")
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        draws = max(self.n - self.num_warmup, 0) // self.thin
        phase = "warmup" if self.n <= self.num_warmup else f"{draws} draws"
        eta = "done" if self.n >= self.total else f"ETA {_duration(left)}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"chain {self.chain}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%, {phase}), "
              f"{rate:.1f} steps/s{extra}, {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.n > self.written:
            self.write(self.clock())


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 0


def _progress(spec: dict[str, Any], chain: int, total: int, done: int) -> Any:
    """A tqdm bar on a terminal at least `MIN_BAR_COLUMNS` wide; `LineProgress` lines otherwise (or without tqdm);
    None with ``progress=False``."""
    if not spec["progress"]:
        return None
    line = LineProgress(chain, total, done)
    line.num_warmup, line.thin = spec["num_warmup"], spec["thin"]
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty or _terminal_columns() < MIN_BAR_COLUMNS:
        return line
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: lines without it
        return line
    return tqdm(total=total, initial=done, desc=f"chain {chain}", position=chain if spec["parallel"] else 0,
                leave=True, dynamic_ncols=True)
